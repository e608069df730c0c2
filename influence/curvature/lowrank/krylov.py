"""``--solver krylov``: the top eigenpairs of the curvature, fitted once, with a floor for the rest.

The matrix is the one the Hessian solvers take (``--hessian``: by default the Gauss–Newton matrix plus the
regulariser's Hessian). Lanczos with full reorthogonalisation (:func:`influence.curvature.lowrank.linalg.lanczos`)
takes one product per step, each a pass over the training archive, until the top ``--rank`` Ritz pairs
have converged or after ``2 × rank`` products. The solution of every test vector is then::

    (A + λI)⁻¹ v  ≈  U (Σ + λ)⁻¹ Uᵀ v + (v − U Uᵀ v) / (φ + λ)

with ``φ = σ_{k+1}`` the floor (docs/DESIGN.md, "Low-rank curvature with a floor"). Per test vector it
costs ``2·k·P`` multiply-adds and no product; self-influence needs each training image's gradient only.

Which pairs are kept: the leading ones whose residual ``‖A u − σ u‖`` is at most ``RTOL × σ`` (a Ritz
pair further down the Krylov space is not an eigenpair yet); ``φ`` is the first Ritz value not kept.

``--hessian full``: the largest eigenvalues are kept whatever their sign; negative curvature that falls
outside the basis is not inverted: the complement is damped by ``max(φ, 0) + λ``. A kept ``σ_j + λ ≤ 0``
(a Hessian more negative than the damping along an eigenvector) is refused, as cg refuses negative
curvature.

``--rank auto`` reads the rank from the spectrum: Lanczos runs for :data:`AUTO_MAX_RANK` pairs (fewer when
the memory budget holds fewer) and keeps the pairs with ``σ_j ≥ AUTO_RATIO × (φ_∞ + λ)``, where ``φ_∞``
is the smallest Ritz value found (the bottom of the spectrum the Krylov space saw).
"""
import logging
import math

import numpy as np

from influence.curvature.lowrank import linalg as lowrank
from influence.curvature.base import InverseHVP, TrainingSums
from influence.errors import SettingError, UserError
from influence.settings import MEMORY_BUDGET_GB, bytes_to_gb, gb_to_bytes, parse_rank
from influence.model.vectors import numpy_to_vec, vec_size, vec_to_numpy
from influence.progress import progress as progress_bar

log = logging.getLogger(__name__)

#: a Ritz pair is kept when its residual is at most RTOL × its value
RTOL = 1e-2
#: ``--rank auto``: the most pairs fitted, and the ratio to the floor + λ that a kept pair must reach
AUTO_MAX_RANK = 200
AUTO_RATIO = 3.0
#: products per pair asked, at most (Lanczos stops earlier when the pairs asked have converged)
STEPS_PER_PAIR = 2
#: the share of ``memory_budget`` the fit's Lanczos basis may take (the rest: test vectors, scoring)
BASIS_SHARE = 0.5
#: ``--solver auto`` takes krylov when the budget holds at least this many pairs
AUTO_MIN_RANK = 64


def affordable_rank(num_params, itemsize, memory_budget):
    """The most pairs whose fit (a Lanczos basis of ``STEPS_PER_PAIR × k`` rows and the ``k`` pairs, each
    ``num_params × itemsize`` bytes) takes at most ``BASIS_SHARE`` of ``memory_budget`` GB; None: no budget."""
    if memory_budget is None:
        return None
    rows = BASIS_SHARE * gb_to_bytes(float(memory_budget)) / (int(num_params) * int(itemsize))
    return int(rows // (STEPS_PER_PAIR + 1))


class KrylovSolver(InverseHVP):
    """Low-rank eigen-decomposition of the curvature with a floor (module docstring)."""

    name = "krylov"
    summary = ("top eigenpairs of the Gauss-Newton matrix by Lanczos, fitted once, with a floor for the rest "
               "(sees across layers; no product per test image)")
    approximates = "lowrank"     # tests/test_curvature_contract.py: the same formula from the dense eigenpairs
    relative_damping = "trace"   # λ = factor × trace(A)/P (influence.curvature.damping)
    takes_diagonal = True        # damping optimizer: (A + c·D)⁻¹ from the same basis (lowrank.diagonal_woodbury)
    self_influence_route = "low-rank"

    def __init__(self, objective, damping, rank="auto", seed=0, memory_budget=MEMORY_BUDGET_GB, progress=True):
        super().__init__(objective, damping, progress)
        self.rank = parse_rank(rank)
        self.seed = int(seed)
        self.memory_budget = memory_budget
        self._u = self._sigma = self._floor = None
        self._woodbury = None
        self._theta = self._residual = None
        self._trace = None
        self.info.update(rank_asked=self.rank)

    # --- sizes -------------------------------------------------------------------------------------
    @property
    def _itemsize(self):
        return self.obj.d.dtype.size

    @property
    def _params(self):
        return vec_size(self.obj.d.variables)

    def max_rank(self):
        """The most pairs the memory budget holds while fitting (:func:`affordable_rank`)."""
        return affordable_rank(self._params, self._itemsize, self.memory_budget)

    def fitted_rank(self):
        """The pairs Lanczos is asked for: ``--rank``, or for ``auto`` :data:`AUTO_MAX_RANK` capped by memory."""
        p = self._params
        if self.rank == "auto":
            cap = self.max_rank()
            return max(1, min(AUTO_MAX_RANK, p if cap is None else cap, p))
        return min(self.rank, p)

    def check_memory(self):
        """SettingError naming ``rank`` and ``params`` when the fit's basis exceeds ``memory_budget``."""
        cap = self.max_rank()
        if cap is None:
            return
        k = self.fitted_rank()
        if cap < 1 or (self.rank != "auto" and k > cap):
            need = bytes_to_gb((STEPS_PER_PAIR + 1) * k * self._params * self._itemsize)
            raise SettingError("rank", f"solver krylov with rank {k} over {self._params:,} parameters needs "
                                       f"{need:.1f} GB for its Lanczos basis, above {BASIS_SHARE:.0%} of "
                                       f"memory_budget {self.memory_budget:g} GB: lower rank (at most "
                                       f"{max(cap, 0)} fits), choose fewer parameters with params (e.g. last:1), "
                                       f"or use solver ekfac")

    @property
    def resident_bytes(self):
        k = self.fitted_rank() if self._u is None else len(self._u)
        return k * self._params * self._itemsize

    @property
    def fit_bytes(self):
        return (STEPS_PER_PAIR + 1) * self.fitted_rank() * self._params * self._itemsize

    # --- the fit (cached) --------------------------------------------------------------------------
    def cache_key(self):
        return {**self.matrix_key(), "rank": self.fitted_rank(), "seed": self.seed}

    def fit(self, sums=None):
        """Lanczos on the whole-set product ``A v`` of ``sums`` (:class:`influence.curvature.base.TrainingSums`;
        default: the objective's ``hvp_full`` in this process; a Ray backend's is sharded over workers)."""
        self.check_memory()
        product = (TrainingSums() if sums is None else sums).product(self.obj)
        like = self.obj.d.variables
        p = self._params
        want = self.fitted_rank()
        steps = min(p, max(STEPS_PER_PAIR * want, want + 10))
        dtype = np.dtype(self.obj.d.dtype.as_numpy_dtype)
        with progress_bar(total=steps, desc=f"krylov: Lanczos for {want} pairs", unit="pass",
                          disable=not self.progress) as bar:
            def apply(q):
                bar.update(1)
                return vec_to_numpy(product(numpy_to_vec(q, like)))

            def done(alpha, beta):
                if len(alpha) < want:
                    return False
                theta, residual = lowrank.ritz_values(alpha, beta)
                ok = lowrank.converged(theta[:want], residual[:want], RTOL).sum()
                bar.set_postfix(converged=f"{ok}/{want}")
                return ok == want
            alpha, beta, basis = lowrank.lanczos(apply, p, steps, dtype=dtype, seed=self.seed, check=done)
        theta, residual, u = lowrank.ritz_pairs(alpha, beta, basis, want)
        del basis
        self._set(u, theta, residual, products=len(alpha))

    def _set(self, u, theta, residual, products=None):
        """Keep the leading converged pairs of ``u`` (k, P) with Ritz values ``theta`` (m,) and their
        residuals; the floor is the first Ritz value not kept."""
        self._theta, self._residual = np.asarray(theta, np.float64), np.asarray(residual, np.float64)
        ok = lowrank.converged(self._theta, self._residual, RTOL)[:len(u)]
        complete = len(self._theta) == self._params       # the Krylov space is the whole space: all exact
        kept = len(u) if ok.all() or complete else int(np.argmin(ok))
        if kept < len(u):
            log.warning("krylov: %d of the %d pairs asked converged (residual <= %g x eigenvalue) after %d "
                        "products; the rest is taken as the floor", kept, len(u), RTOL, len(self._theta))
        self._all_u = u
        self._kept = kept
        self.info.update(products=products if products is not None else self.info.get("products"),
                         rank_fitted=len(u), converged=int(kept), ritz_values=self._theta.tolist(),
                         residuals=self._residual.tolist(), num_params=self._params)
        self._choose_rank()

    def set_damping(self, damping):
        """λ changed on the fitted basis: the auto rank is chosen again for it (:meth:`InverseHVP.set_damping`)."""
        self.damping = damping
        if self._theta is not None:
            self._choose_rank()

    def _choose_rank(self):
        """The rank used (``--rank`` or the auto rule over the converged pairs), σ, U and the floor φ."""
        kept = self._kept
        theta = self._theta
        self._woodbury = None
        if self.rank == "auto":
            bottom = max(float(theta[-1]), 0.0)
            # damping optimizer: every converged pair (the floor φ adds to c·D_j outside the basis: keep it low)
            limit = AUTO_RATIO * (bottom + (0.0 if self.response_diagonal() is not None else self.damping))
            k = int(np.sum(theta[:kept] >= limit))
            self.info.update(auto_rule=f"sigma >= {AUTO_RATIO:g} x (smallest Ritz value {bottom:.3g} + damping)")
        else:
            k = min(kept, self.rank)
        self._u = self._all_u[:k]
        self._sigma = theta[:k]
        floor = float(theta[k]) if k < len(theta) else float(theta[-1])
        self._floor = max(floor, 0.0)
        lam = self._scalar_damping()
        if k and self._sigma[-1] + lam <= 0 or self._floor + lam <= 0:
            raise UserError(f"krylov: A + λI is not positive definite along its eigenvectors (eigenvalue "
                            f"{min(self._sigma.min() if k else floor, floor):.3g}, damping {lam:.3g}): raise "
                            f"damping, or use hessian='ggn'")
        negative = float(theta[-1])
        if k < len(theta) and negative < -lam:
            log.warning("krylov: the matrix has eigenvalues down to %.3g, below -λ = %.3g, outside the rank kept: "
                        "those directions are damped by the floor, not inverted (hessian='ggn' has none)",
                        negative, -lam)
        self.info.update(rank=k, floor=self._floor, sigma_max=float(theta[0]) if len(theta) else 0.0,
                         residual_max=float(self._residual[:k].max()) if k else 0.0,
                         smallest_ritz_value=negative)
        log.info("krylov: rank %d (%d pairs converged of %d fitted), σ from %.3g to %.3g, floor %.3g, %s %.3g",
                 k, kept, len(self._all_u), theta[0], self._sigma[-1] if k else math.nan, self._floor,
                 "λ" if self.response_diagonal() is None else "per-parameter λ, mean", lam)

    def mean_eigenvalue(self):
        """Hutchinson's ``trace(A)/P`` (base class), estimated once and cached with the basis, so that a
        rerun with a relative damping takes no product."""
        if self._trace is None:
            self._trace = tuple(super().mean_eigenvalue())
        return self._trace

    def state(self):
        state = {"u": self._all_u, "theta": self._theta, "residual": self._residual,
                 "products": np.array(self.info.get("products") or 0)}
        if self._trace is not None:
            state["trace"] = np.array(self._trace, np.float64)
        return state

    def load_state(self, arrays):
        u = np.asarray(arrays["u"])
        if u.ndim != 2 or u.shape[1] != self._params:
            raise ValueError(f"cached krylov basis is {u.shape}, expected (k, {self._params})")
        if "trace" in arrays:
            mean, error, probes = (float(t) for t in np.asarray(arrays["trace"]))
            self._trace = (mean, error, int(probes))
        self._set(u, arrays["theta"], arrays["residual"], products=int(arrays["products"]))

    def compact(self):
        """Keep only the pairs in use (a copy: the slice would hold the whole fitted basis)."""
        if self._u is not None and self._u.base is not None:
            self._u = self._u.copy()
        self._all_u = self._u

    # --- per test vector -----------------------------------------------------------------------------
    def _ready(self):
        if self._u is None:
            self.fit()

    def _scalar_damping(self):
        """λ, or with ``damping optimizer`` the mean of ``c·D`` (what the auto rank and the checks compare with)."""
        diagonal = self.response_diagonal()
        return self.damping if diagonal is None else self.damping * float(np.mean(diagonal))

    def _diagonal_pieces(self):
        """:func:`lowrank.diagonal_woodbury` of the basis in use with ``D' = c·D`` (``damping optimizer``), kept."""
        if self._woodbury is None:
            self._woodbury = lowrank.diagonal_woodbury(self._u, self._sigma, self._floor,
                                                       self.damping * self.response_diagonal())
        return self._woodbury

    def solve_numpy(self, v):
        """(T, P) -> (T, P) float64, the low-rank ``(A + λI)⁻¹ v``; with ``damping optimizer``
        ``(A + c·D)⁻¹ v`` for the same low-rank ``A`` (Woodbury: :func:`lowrank.diagonal_inverse`)."""
        self._ready()
        if self.response_diagonal() is None:
            return lowrank.lowrank_inverse(self._u, self._sigma, self._floor, self.damping, v)
        return lowrank.diagonal_inverse(self._u, self._diagonal_pieces(), v)

    def precondition_numpy(self, v):
        """(T, P) -> (T, P): the Nyström preconditioner of the same basis (``(φ + λ) ×`` :meth:`solve_numpy`);
        with damping ``optimizer`` the Woodbury inverse ``(A + c·D)⁻¹`` itself (symmetric positive definite)."""
        self._ready()
        if self.response_diagonal() is not None:
            return self.solve_numpy(v)
        return lowrank.nystrom_precondition(self._u, self._sigma, self._floor, self.damping, v)

    def solve(self, vectors, ids=None):
        return self.solve_rows(self.solve_numpy, vectors)

    def self_influence_batch(self, x, y):
        """``gᵢᵀ (A + λI)⁻¹ gᵢ`` of each image with its own label: images (N, H, W, C), (N,) -> float64 (N,),
        from ``U gᵢ`` and ``‖gᵢ‖²`` (one tape per image for the gradients)."""
        self._ready()
        grads = self.image_gradients(x, y)
        if self.response_diagonal() is not None:          # damping optimizer: Woodbury's quadratic form
            return lowrank.diagonal_quadratic(self._u, self._diagonal_pieces(), grads)
        proj = grads @ self._u.T.astype(np.float64)
        return lowrank.self_quadratic(proj, np.einsum("np,np->n", grads, grads), self._sigma, self._floor,
                                      self.damping)
