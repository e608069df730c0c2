"""``--solver cg``: conjugate gradient on ``(H + λI) x = v`` with whole-training-set HVPs."""
import logging
import math

from influence.curvature.base import InverseHVP
from influence.errors import UserError
from influence.model.vectors import vec_axpy, vec_dot, vec_scale
from influence.progress import progress as progress_bar

log = logging.getLogger(__name__)

NEGATIVE_CURVATURE = ("{solver} met negative curvature: H + λI is not positive definite here; "
                      "raise damping, or use hessian='ggn' (positive semi-definite, for a model away from a minimum)")


def conjugate_gradient(apply, v, *, tol, maxiter, x0=None, precondition=None, bar=None, solver="cg"):
    """Solve ``A x = v`` for a symmetric positive definite operator ``A`` (on Vecs).

    Args:
      apply: Vec -> Vec, ``A x``.
      v: the right-hand side (a Vec).
      tol: stop when ``‖v - A x‖ ≤ tol·‖v‖``.
      maxiter: iteration cap.
      x0: starting point (default 0).
      precondition: Vec -> Vec, ``M⁻¹ r`` for a symmetric positive definite ``M`` (default: none).
      bar: optional progress bar (updated once per iteration).

    Returns:
      ``(x, iterations, relative residual)``. Raises :class:`UserError` on negative curvature.
    """
    norm_v = max(math.sqrt(vec_dot(v, v)), 1e-300)
    if x0 is None:
        x = vec_scale(0.0, v)
        r = tuple(v)
    else:
        x = tuple(x0)
        r = vec_axpy(-1.0, apply(x), v)
    z = precondition(r) if precondition else r
    p = tuple(z)
    rz = vec_dot(r, z)
    rr = vec_dot(r, r)
    target = tol * norm_v
    it = 0
    while it < maxiter and math.sqrt(rr) > target:
        ap = apply(p)
        pap = vec_dot(p, ap)
        if pap <= 0:
            raise UserError(NEGATIVE_CURVATURE.format(solver=solver))
        alpha = rz / pap
        x = vec_axpy(alpha, p, x)
        r = vec_axpy(-alpha, ap, r)
        z = precondition(r) if precondition else r
        rz_new = vec_dot(r, z)
        rr = vec_dot(r, r)
        p = vec_axpy(rz_new / rz, p, z)
        rz = rz_new
        it += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(residual=f"{math.sqrt(rr) / norm_v:.2e}")
    return x, it, math.sqrt(rr) / norm_v


class CGSolver(InverseHVP):
    """Conjugate gradient with whole-training-set HVPs.

    Stops when ``‖r‖ ≤ tol·‖v‖`` or after ``maxiter`` iterations (with a warning).
    """

    name = "cg"
    summary = "conjugate gradient on whole-training-set HVPs (exact answer, ~30 HVP passes per test image)"
    approximates = "hessian"   # what the contract test (tests/test_curvature_contract.py) compares with
    relative_damping = "trace"   # λ = factor × trace(H)/P (influence.curvature.damping)
    takes_diagonal = True        # damping optimizer: every product is (H + c·D) v (InverseHVP.damped_product)

    def __init__(self, objective, damping, cg_tol=1e-6, cg_maxiter=200, progress=True):
        super().__init__(objective, damping, progress)
        self.tol = float(cg_tol)
        self.maxiter = int(cg_maxiter)
        # per test image: iterations, and whole-training-set HVP passes (the cost; pcg adds its start's)
        self.info.update(tol=self.tol, maxiter=self.maxiter, iterations=[], hvp_passes=[])

    workspace_vectors = 4          # x, r, p, A p of the vector being solved

    def solve(self, vectors, ids=None):
        return [self._solve_one(v) for v in vectors]

    def _start(self, v):
        """Starting point and preconditioner (none for plain CG)."""
        return None, None

    def _solve_one(self, v):
        x0, precondition = self._start(v)
        with progress_bar(total=self.maxiter, desc=self.name, unit="it", disable=not self.progress) as bar:
            x, it, residual = conjugate_gradient(self.apply, v, tol=self.tol, maxiter=self.maxiter, x0=x0,
                                                 precondition=precondition, bar=bar, solver=self.name)
        if residual > self.tol:
            log.warning("%s stopped after %d iterations at relative residual %.2e (cg_tol %.0e)",
                        self.name, it, residual, self.tol)
        self.info["iterations"].append(it)
        self.info["hvp_passes"].append(it + (x0 is not None))
        return x
