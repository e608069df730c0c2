"""Conjugate gradient for several test vectors at once, preconditioned by a fitted method: what pcg and
dpcg share.

Lockstep: the test vectors of one ``solve`` call iterate together. Every iteration is ONE pass over
the training archive whose chunks serve the HVPs of all vectors still running
(:func:`hvp_full_many`); a vector that has converged drops out. The start is the preconditioning
method's solution ``x_0 = M⁻¹ v`` (one extra HVP pass for its residual); ``info["iterations"]`` lists
the CG iterations per vector and ``info["hvps"]`` the HVPs (iterations + 1).
"""
import logging
import math

import numpy as np

from influence.curvature.iterative.cg import NEGATIVE_CURVATURE, CGSolver
from influence.errors import UserError
from influence.model.vectors import vec_axpy, vec_dot, vec_scale
from influence.progress import progress as progress_bar

log = logging.getLogger(__name__)


def hvp_full_many(objective, vecs):
    """``[H v for v in vecs]`` over the whole training set, one archive read per chunk for all of them.

    ``H = ∇²(mean_i L(z_i) + Ω)``, as :meth:`influence.model.objective.TrainingObjective.hvp_full`; ``vecs`` is a
    list of Vecs, the result a list of Vecs (same order).
    """
    vecs = list(vecs)
    if not vecs:
        return []
    d, n, chunk = objective.d, objective.n, objective.chunk
    weight = objective.scalar(1.0 / n)
    totals = [None] * len(vecs)
    for start in range(0, n, chunk):
        x, y = objective.archive.take(np.arange(start, min(start + chunk, n)))
        y = np.asarray(y, np.int64)
        reg = objective.scalar(1.0 if start == 0 else 0.0)
        for k, v in enumerate(vecs):
            part = objective.vp(x, y, v, weight, reg)
            totals[k] = part if totals[k] is None else tuple(a + b for a, b in zip(totals[k], part))
    return totals


def lockstep_pcg(apply_many, vs, *, tol, maxiter, precondition=None, x0s=None, bar=None, solver="pcg"):
    """Preconditioned CG on ``A x = v`` for several right-hand sides, iterating together.

    Args:
      apply_many: list of Vecs -> list of Vecs, ``[A x for x]`` (one call = one pass for all).
      vs: list of right-hand sides (Vecs).
      tol: stop a vector when ``‖v − A x‖ ≤ tol·‖v‖``.
      maxiter: iteration cap per vector.
      precondition: Vec -> Vec, ``M⁻¹ r`` for a symmetric positive definite ``M`` (default: none).
      x0s: starting points (default 0: no initial pass).
      bar: optional progress bar, updated once per pass.

    Returns:
      list of ``(x, iterations, relative residual)``, one per ``v``. Raises a ``UserError`` on
      negative curvature (``pᵀ A p ≤ 0``), as :func:`influence.curvature.cg.conjugate_gradient`.
    """
    vs = list(vs)
    count = len(vs)
    prec = precondition or (lambda r: r)
    norms = [max(math.sqrt(vec_dot(v, v)), 1e-300) for v in vs]
    if x0s is None:
        xs = [vec_scale(0.0, v) for v in vs]
        rs = [tuple(v) for v in vs]
    else:
        xs = [tuple(x) for x in x0s]
        rs = [vec_axpy(-1.0, ax, v) for ax, v in zip(apply_many(xs), vs)]
        if bar is not None:
            bar.update(1)
    zs = [prec(r) for r in rs]
    ps = list(zs)
    rz = [vec_dot(r, z) for r, z in zip(rs, zs)]
    rr = [vec_dot(r, r) for r in rs]
    its = [0] * count

    def running(t):
        return its[t] < maxiter and math.sqrt(rr[t]) > tol * norms[t]

    active = [t for t in range(count) if running(t)]
    while active:
        aps = apply_many([ps[t] for t in active])
        for t, ap in zip(active, aps):
            pap = vec_dot(ps[t], ap)
            if pap <= 0:
                raise UserError(NEGATIVE_CURVATURE.format(solver=solver))
            alpha = rz[t] / pap
            xs[t] = vec_axpy(alpha, ps[t], xs[t])
            rs[t] = vec_axpy(-alpha, ap, rs[t])
            z = prec(rs[t])
            rz_new = vec_dot(rs[t], z)
            rr[t] = vec_dot(rs[t], rs[t])
            ps[t] = vec_axpy(rz_new / rz[t], ps[t], z)
            rz[t] = rz_new
            its[t] += 1
        active = [t for t in active if running(t)]
        if bar is not None:
            bar.update(1)
            worst = max(math.sqrt(rr[t]) / norms[t] for t in range(count))
            bar.set_postfix(running=len(active), residual=f"{worst:.2e}")
    return [(xs[t], its[t], math.sqrt(rr[t]) / norms[t]) for t in range(count)]


class LockstepCG(CGSolver):
    """CG preconditioned by a fitted method (``part``) whose fit, cache entry and resident state it shares;
    the test vectors of a group iterate in lockstep (:func:`solve_in_lockstep`). Not registered: pcg and
    dpcg name their part."""

    approximates = "hessian"
    relative_damping = "trace"   # CG's λ from trace(H)/P
    #: lockstep CG holds x, r, p, z and A p of every vector of the group, beside gradient, solution, stack
    copies_per_vector = 8

    @property
    def part(self):  # pragma: no cover - interface
        """The fitted method that preconditions."""
        raise NotImplementedError

    # --- the part's fit, shared with its own --solver ----------------------------------------------------
    def cache_key(self):
        return self.part.cache_key()

    def fit(self, sums=None):
        self.part.fit(sums)

    def state(self):
        return self.part.state()

    def load_state(self, arrays):
        self.part.load_state(arrays)

    def compact(self):
        self.part.compact()

    def self_influence_ready(self):
        return self.part.self_influence_ready()

    @property
    def resident_bytes(self):
        return self.part.resident_bytes

    def set_damping(self, damping):
        """CG's λ and the preconditioning part's (its own fitted state re-damped)."""
        self.damping = damping
        self.part.set_damping(damping)

    @property
    def fit_bytes(self):
        """The part's fit's peak (None when its fit holds nothing large): the fit's chunk is planned by it."""
        return getattr(self.part, "fit_bytes", None)

    @property
    def signal_rows(self):
        """Backward signals per training image of the part's fit (K-FAC's Fisher rows; 1 for an HVP)."""
        return getattr(self.part, "signal_rows", 1)

    # --- per test vector -----------------------------------------------------------------------------------
    def apply_many(self, vecs):
        """``[(H + λI) v for v in vecs]`` in one pass over the training set (``H + c·D`` with damping optimizer)."""
        return [self.damped_product(v, hv) for v, hv in zip(vecs, hvp_full_many(self.obj, vecs))]



def solve_in_lockstep(solver, vectors, x0s, precondition):
    """The preconditioned CG solutions of ``vectors`` (a list of Vecs) from ``x0s``, all in lockstep
    (:func:`lockstep_pcg` over ``solver.apply_many``), with ``solver``'s tolerance and cap, a progress bar, a
    warning per vector left above the tolerance, and ``solver.info``'s iterations, hvps and hvp_passes."""
    with progress_bar(total=solver.maxiter + 1, desc=f"{solver.name} x{len(vectors)}", unit="pass",
                      disable=not solver.progress) as bar:
        results = lockstep_pcg(solver.apply_many, vectors, tol=solver.tol, maxiter=solver.maxiter,
                               precondition=precondition, x0s=x0s, bar=bar, solver=solver.name)
    out = []
    for x, it, residual in results:
        if residual > solver.tol:
            log.warning("%s stopped after %d iterations at relative residual %.2e (cg_tol %.0e)",
                        solver.name, it, residual, solver.tol)
        solver.info["iterations"].append(it)
        solver.info["hvps"].append(it + 1)
        solver.info["hvp_passes"].append(it + 1)
        out.append(x)
    return out
