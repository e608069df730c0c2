"""``--solver pcg``: conjugate gradient on ``(H + λI) x = v`` preconditioned by EK-FAC.

The preconditioner is ``M⁻¹ = (F_ekfac + Ω'' + λI)⁻¹`` from the EK-FAC fit
(:mod:`influence.curvature.kfac.solver`); its state is the EK-FAC state, cached under the same entry
(``cache_name = "ekfac"``), so ``--solver ekfac`` and ``--solver pcg`` share one fit. The answer is
the exact ``(H + λI)⁻¹ v`` up to ``--cg-tol`` (same stopping rule as ``cg``: ``‖v − (H + λI)x‖ ≤
tol·‖v‖``); EK-FAC only decides how many HVP passes that takes. The test vectors of a group iterate in
lockstep from the EK-FAC solution (:mod:`influence.curvature.iterative.lockstep`).
"""
from influence.curvature.iterative.lockstep import LockstepCG, solve_in_lockstep
from influence.curvature.kfac.plan import MAX_BLOCK
from influence.curvature.kfac.solver import EKFACSolver
from influence.settings import MEMORY_BUDGET_GB


class _Preconditioner(EKFACSolver):
    """EK-FAC as a preconditioner: a regulariser it cannot represent is left out (logged), not refused."""

    strict_regularisers = False


class PCGSolver(LockstepCG):
    """CG preconditioned by EK-FAC, started from the EK-FAC solution; test vectors in lockstep."""

    name = "pcg"
    summary = ("conjugate gradient preconditioned by EK-FAC (exact answer like cg, a few HVP passes per test "
               "image; shares the ekfac fit)")
    cache_name = "ekfac"         # (its EK-FAC preconditioner takes λ per layer, CG one from trace(H)/P)

    def __init__(self, objective, damping, fisher="auto", seed=0, ekfac_max_block=MAX_BLOCK, memory_budget=MEMORY_BUDGET_GB,
                 cg_tol=1e-6, cg_maxiter=200, progress=True):
        super().__init__(objective, damping, cg_tol=cg_tol, cg_maxiter=cg_maxiter, progress=progress)
        self.ekfac = _Preconditioner(objective, damping, fisher=fisher, seed=seed, ekfac_max_block=ekfac_max_block,
                                     memory_budget=memory_budget, progress=progress)
        self.info.update(preconditioner=self.ekfac.info, hvps=[])

    @property
    def part(self):
        return self.ekfac

    @property
    def workspace_bytes(self):
        return self.ekfac.workspace_bytes

    def _start(self, v):
        """Start and preconditioner of the single-vector path (CGSolver._solve_one)."""
        return self.ekfac.precondition(v), self.ekfac.precondition

    def solve(self, vectors, ids=None):
        vectors = list(vectors)
        return solve_in_lockstep(self, vectors, self.ekfac.solve(vectors), self.ekfac.precondition) if vectors else []
