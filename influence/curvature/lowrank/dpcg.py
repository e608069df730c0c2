"""``--solver dpcg``: conjugate gradient on ``(A + λI) x = v`` deflated by the krylov basis.

The preconditioner is the Nyström one of the cached eigenpairs (:mod:`influence.curvature.lowrank.krylov`, the same
fit and cache entry)::

    P⁻¹ = (φ + λ) U (Σ + λ)⁻¹ Uᵀ + (I − U Uᵀ)

so CG sees a condition number of about ``(φ + λ) / λ`` instead of ``(σ_1 + λ) / λ`` (φ the floor: the first
eigenvalue left out). The start is the krylov solution; the test vectors of a group iterate in lockstep,
each iteration one pass over the training archive for all of them
(:func:`influence.curvature.iterative.lockstep.solve_in_lockstep`). The answer is cg's, to ``--cg-tol``.

Self-influence comes from the same basis, without CG: it is krylov's, the low-rank
``gᵢᵀ (U (Σ + λ)⁻¹ Uᵀ + (I − U Uᵀ) / (φ + λ)) gᵢ`` of each training image's gradient
(:meth:`influence.curvature.lowrank.krylov.KrylovSolver.self_influence_batch`, the same pairs, floor and λ), not
the exact ``gᵢᵀ (A + λI)⁻¹ gᵢ`` that CG would give per image.
"""
from influence.curvature.base import InverseHVP
from influence.curvature.iterative.lockstep import LockstepCG, solve_in_lockstep
from influence.curvature.lowrank.krylov import KrylovSolver
from influence.settings import MEMORY_BUDGET_GB


class DeflatedPCGSolver(LockstepCG):
    """CG preconditioned by the krylov eigenpairs, started from the krylov solution; vectors in lockstep."""

    name = "dpcg"
    summary = ("conjugate gradient preconditioned by the krylov eigenpairs (exact answer like cg in a few passes "
               "per group of test images; shares the krylov fit)")
    cache_name = "krylov"
    #: self-influence from the krylov basis (no CG per training image): krylov's low-rank numbers
    self_influence_route = "krylov's low-rank basis"

    def __init__(self, objective, damping, rank="auto", seed=0, memory_budget=MEMORY_BUDGET_GB, cg_tol=1e-6, cg_maxiter=200,
                 progress=True):
        super().__init__(objective, damping, cg_tol=cg_tol, cg_maxiter=cg_maxiter, progress=progress)
        self.krylov = KrylovSolver(objective, damping, rank=rank, seed=seed, memory_budget=memory_budget,
                                   progress=progress)
        self.info.update(preconditioner=self.krylov.info, hvps=[])

    @property
    def damping(self):
        """λ, resolved once by the krylov part (a relative damping costs one trace estimate, not two)."""
        if "krylov" not in self.__dict__:          # during __init__
            return InverseHVP.damping.fget(self)
        return self.krylov.damping

    @damping.setter
    def damping(self, value):
        self.damping_spec = self.check_damping(value)
        self._resolved = None
        if hasattr(self, "krylov"):
            self.krylov.damping = value

    @property
    def part(self):
        return self.krylov

    # --- per test vector -------------------------------------------------------------------------------
    def _vec_map(self, fn):
        """A numpy function of (T, P) rows as a function of one Vec."""
        return lambda v: self.solve_rows(fn, [v])[0]

    def _start(self, v):
        """Start and preconditioner of the single-vector path (CGSolver._solve_one)."""
        return self._vec_map(self.krylov.solve_numpy)(v), self._vec_map(self.krylov.precondition_numpy)

    def self_influence_batch(self, x, y):
        """krylov's self-influence from the preconditioner's basis: images (N, H, W, C), (N,) -> float64 (N,),
        ``Σ_j (u_jᵀgᵢ)²/(σ_j + λ) + (‖gᵢ‖² − Σ_j (u_jᵀgᵢ)²)/(φ + λ)`` (module docstring), the formula and
        numbers of ``--solver krylov`` with the same basis and damping; the low-rank approximation, not CG's
        exact answer."""
        return self.krylov.self_influence_batch(x, y)

    def solve(self, vectors, ids=None):
        vectors = list(vectors)
        if not vectors:
            return []
        x0s = self.solve_rows(self.krylov.solve_numpy, vectors)
        return solve_in_lockstep(self, vectors, x0s, self._vec_map(self.krylov.precondition_numpy))
