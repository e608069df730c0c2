"""Inverse-Hessian-vector products: ``solve(V) -> [(H + λI)⁻¹ v for v in V]``.

Three solvers plug in behind one method, :meth:`InverseHVP.solve`:

* :class:`ExactSolver` -- dense ``H`` from one HVP per parameter over the whole training set, then
  ``numpy.linalg.solve`` in float64 (small models; the reference the others are checked against);
* :class:`CGSolver` -- conjugate gradient on whole-training-set HVPs;
* :class:`LissaSolver` -- the stochastic recursion of Agarwal et al. used by Koh & Liang::

      h_0 = v;   h_j = v + h_{j-1} − (H̃_j h_{j-1} + λ h_{j-1}) / s;   result = mean_r h_T / s

  where ``H̃_j`` is the Hessian of ``mean L + Ω`` on ``b`` images drawn uniformly from the whole
  training archive, ``s`` the scale, ``T`` the depth, ``r`` the repeats. The fixed point is
  ``(H + λI)⁻¹ v``; it converges when ``s > λ_max(H + λI)`` and ``H + λI`` is positive definite.
"""
import logging
import math

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from influence.errors import UserError
from influence.hvp import numpy_to_vec, vec_axpy, vec_dot, vec_norm, vec_scale, vec_size, vec_to_numpy

log = logging.getLogger(__name__)


class InverseHVP:
    """Base class: ``solve(vectors) -> list`` of Vecs, ``(H + λI)⁻¹ v`` for each ``v``."""

    name = "base"

    def __init__(self, objective, damping):
        if damping < 0:
            raise UserError(f"--damping must be >= 0, got {damping}")
        self.obj = objective
        self.damping = float(damping)
        self.info = {"solver": self.name, "damping": self.damping}

    def solve(self, vectors):  # pragma: no cover - interface
        raise NotImplementedError

    def apply(self, v):
        """(H + λI) v over the whole training set."""
        return vec_axpy(self.damping, v, self.obj.hvp_full(v))


# ----------------------------------------------------------------------------- exact

class ExactSolver(InverseHVP):
    """Dense ``H + λI`` (float64), built once; refuses models with more than ``max_params``."""

    name = "exact"

    def __init__(self, objective, damping, max_params=10_000, progress=True):
        super().__init__(objective, damping)
        self.max_params = int(max_params)
        self.progress = progress
        self._matrix = None

    def matrix(self):
        """(P, P) float64 ``H + λI``, symmetrised."""
        if self._matrix is None:
            like = self.obj.d.variables
            p = vec_size(like)
            if p > self.max_params:
                raise UserError(
                    f"--solver exact needs a dense {p}x{p} Hessian: {p} parameters is above the limit of "
                    f"{self.max_params} (raise --max-exact-params, choose fewer with --params, or use cg/lissa)"
                )
            h = np.zeros((p, p))
            eye = np.eye(p)
            for k in tqdm(range(p), desc="exact Hessian", unit="col", disable=not self.progress, leave=False):
                h[:, k] = vec_to_numpy(self.obj.hvp_full(numpy_to_vec(eye[k], like)))
            h = 0.5 * (h + h.T) + self.damping * np.eye(p)
            w = np.linalg.eigvalsh(h)
            self.info.update(lambda_min=float(w[0]), lambda_max=float(w[-1]), num_params=p)
            if w[0] <= 0:
                log.warning("H + λI is not positive definite (smallest eigenvalue %.3g): raise --damping", w[0])
            self._matrix = h
        return self._matrix

    def solve(self, vectors):
        a = self.matrix()
        like = self.obj.d.variables
        rhs = np.stack([vec_to_numpy(v) for v in vectors], axis=1)
        sol = np.linalg.solve(a, rhs)
        return [numpy_to_vec(sol[:, i], like) for i in range(sol.shape[1])]


# ----------------------------------------------------------------------------- conjugate gradient

class CGSolver(InverseHVP):
    """Conjugate gradient on ``(H + λI) x = v`` with whole-training-set HVPs.

    Stops when ``‖r‖ ≤ tol·‖v‖`` or after ``maxiter`` iterations (with a warning).
    """

    name = "cg"

    def __init__(self, objective, damping, tol=1e-6, maxiter=200, progress=True):
        super().__init__(objective, damping)
        self.tol = float(tol)
        self.maxiter = int(maxiter)
        self.progress = progress
        self.info.update(tol=self.tol, maxiter=self.maxiter, iterations=[])

    def solve(self, vectors):
        return [self._solve_one(v) for v in vectors]

    def _solve_one(self, v):
        x = vec_scale(0.0, v)
        r = tuple(v)
        p = tuple(v)
        rr = vec_dot(r, r)
        norm_v = max(math.sqrt(rr), 1e-300)
        target = self.tol * norm_v
        bar = tqdm(total=self.maxiter, desc="cg", unit="it", disable=not self.progress, leave=False)
        it = 0
        while it < self.maxiter and math.sqrt(rr) > target:
            ap = self.apply(p)
            pap = vec_dot(p, ap)
            if pap <= 0:
                raise UserError(
                    "cg met negative curvature: H + λI is not positive definite here; raise --damping"
                )
            alpha = rr / pap
            x = vec_axpy(alpha, p, x)
            r = vec_axpy(-alpha, ap, r)
            rr_new = vec_dot(r, r)
            p = vec_axpy(rr_new / rr, p, r)
            rr = rr_new
            it += 1
            bar.update(1)
            bar.set_postfix(residual=f"{math.sqrt(rr) / norm_v:.2e}")
        bar.close()
        if math.sqrt(rr) > target:
            log.warning("cg stopped after %d iterations at relative residual %.2e (--cg-tol %.0e)",
                        it, math.sqrt(rr) / norm_v, self.tol)
        self.info["iterations"].append(it)
        return x


# ----------------------------------------------------------------------------- lambda_max

def power_iteration(matvec, like, iters=100, tol=1e-4, seed=0):
    """Dominant eigenvalue (largest |μ|, signed) of the symmetric operator ``matvec`` on Vecs.

    Returns ``(mu, iterations)``; stops when the Rayleigh quotient changes by less than ``tol``
    relatively.
    """
    rng = np.random.default_rng(seed)
    v = numpy_to_vec(rng.standard_normal(vec_size(like)), like)
    v = vec_scale(1.0 / vec_norm(v), v)
    mu = 0.0
    for i in range(1, iters + 1):
        w = matvec(v)
        new_mu = vec_dot(v, w)
        norm = vec_norm(w)
        if not np.isfinite(norm) or norm == 0:
            return new_mu, i
        v = vec_scale(1.0 / norm, w)
        if i > 1 and abs(new_mu - mu) <= tol * abs(new_mu):
            return new_mu, i
        mu = new_mu
    return mu, iters


def estimate_lambda_max(objective, damping, sample=1024, iters=100, tol=1e-4, seed=0):
    """λ_max(H + λI) by power iteration on HVPs over ``sample`` training images (all when fewer)."""
    rng = np.random.default_rng(seed)
    n = objective.n
    idx = np.sort(rng.choice(n, size=min(sample, n), replace=False))
    mu, it = power_iteration(lambda v: objective.hvp_full(v, idx), objective.d.variables, iters, tol, seed)
    return abs(mu) + damping, it


# ----------------------------------------------------------------------------- LiSSA

class LissaSolver(InverseHVP):
    """LiSSA (see the module docstring). ``scale=None`` means 1.1 × estimated λ_max(H + λI)."""

    name = "lissa"

    def __init__(self, objective, damping, depth=1000, batch=10, repeats=1, scale=None, seed=0,
                 lambda_sample=1024, progress=True):
        super().__init__(objective, damping)
        if depth < 1 or batch < 1 or repeats < 1:
            raise UserError("LiSSA needs -i/--iter >= 1, -b/--bsize >= 1 and --repeats >= 1")
        self.depth, self.batch, self.repeats = int(depth), int(batch), int(repeats)
        self.rng = np.random.default_rng(seed)
        self.progress = progress
        if scale is None:
            lam, it = estimate_lambda_max(objective, self.damping, sample=lambda_sample, seed=seed)
            lam_b = self._minibatch_lambda_max(seed)
            scale = 1.1 * max(lam, lam_b)
            self.info.update(lambda_max=lam, lambda_iterations=it, lambda_max_minibatch=lam_b)
            log.info("LiSSA scale: auto = 1.1 x λ_max(H + λI) = 1.1 x %.4g = %.4g (power iteration: %.4g on %d "
                     "images, %.4g on minibatches of %d)", max(lam, lam_b), scale, lam,
                     min(lambda_sample, objective.n), lam_b, self.batch)
        if scale <= 0:
            raise UserError(f"--scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.info.update(scale=self.scale, depth=self.depth, batch=self.batch, repeats=self.repeats)
        d = objective.d
        self._step = tf.function(self._step_fn, input_signature=[d.x_spec, d.y_spec, d.vec_spec, d.vec_spec])

    def _minibatch_lambda_max(self, seed, batches=4):
        """Largest λ_max(H̃ + λI) over a few random minibatches of size b.

        Each recursion step multiplies by (I - (H̃_j + λI)/s); it stays a contraction only while
        every minibatch Hessian's eigenvalues are below 2s. Small minibatches have much larger
        curvature than the whole set (the demo CNN: 0.28 on 1500 images, several times that on
        32), so a scale from the whole set alone lets the recursion blow up.
        """
        rng = np.random.default_rng(seed + 1)
        worst = 0.0
        for _ in range(batches):
            idx = np.sort(rng.integers(0, self.obj.n, self.batch))
            x, y = self.obj.archive.take(idx)
            y = y.astype(np.int64)
            mu, _ = power_iteration(lambda v: self.obj.hvp_minibatch(v, x, y), self.obj.d.variables,
                                    iters=30, tol=1e-3, seed=seed)
            worst = max(worst, abs(mu) + self.damping)
        return worst

    def _step_fn(self, x, y, v, h):
        """One recursion step; returns (h_new, ‖h_new‖²)."""
        d = self.obj.d
        dtype = d.dtype
        hv = d._hvp(x, y, h, tf.cast(1.0 / tf.cast(tf.shape(y)[0], tf.float64), dtype), tf.constant(1.0, dtype))
        inv_s = tf.constant(1.0 / self.scale, dtype)
        keep = tf.constant(1.0 - self.damping / self.scale, dtype)
        new = tuple(vi + keep * hi - inv_s * hvi for vi, hi, hvi in zip(v, h, hv))
        # the norm only feeds the progress bar and the divergence check: no float64 copies
        sq = tf.cast(tf.add_n([2.0 * tf.nn.l2_loss(t) for t in new]), tf.float64)
        return new, sq

    def solve(self, vectors):
        vectors = list(vectors)
        norms_v = [vec_norm(v) for v in vectors]
        # When H + λI is positive definite with eigenvalues below 2s, every ‖(I - A/s)^k‖ ≤ 1, so
        # ‖h_j‖ ≤ (j + 1)·‖v‖, and ‖h_j‖ ≤ ‖v‖·s/λ_min(A) ≤ ‖v‖·s/λ when H ⪰ 0. Minibatch noise
        # gets a margin of 5; growing past that means negative curvature below -λ or s too small.
        cap = self.scale / self.damping if self.damping > 0 else float("inf")
        total = [vec_scale(0.0, v) for v in vectors]
        n = self.obj.n
        for rep in range(self.repeats):
            h = list(vectors)
            desc = "LiSSA" if self.repeats == 1 else f"LiSSA {rep + 1}/{self.repeats}"
            bar = tqdm(range(self.depth), desc=f"{desc} ({len(vectors)} vec)", unit="it",
                       disable=not self.progress, leave=False)
            for j in bar:
                x, y = self.obj.archive.take(np.sort(self.rng.integers(0, n, self.batch)))
                y = y.astype(np.int64)
                worst = 0.0
                for t, v in enumerate(vectors):
                    h[t], sq = self._step(x, y, v, h[t])
                    norm = math.sqrt(float(sq))
                    ratio = norm / max(norms_v[t], 1e-300)
                    if not np.isfinite(ratio) or (j >= 5 and ratio > 5.0 * min(j + 1, cap)):
                        bar.close()
                        raise UserError(
                            f"LiSSA diverged at step {j + 1} (‖h‖/‖v‖ = {ratio:.3g}): H + λI has negative "
                            f"curvature or the scale is too small; use a larger --damping (now {self.damping:g}) "
                            f"or a larger --scale (now {self.scale:.4g})"
                        )
                    worst = max(worst, norm / self.scale)
                if j % 10 == 0 or j == self.depth - 1:
                    bar.set_postfix(norm=f"{worst:.4g}")  # ‖h_j / s‖: the current estimate
            bar.close()
            for t in range(len(vectors)):
                total[t] = vec_axpy(1.0 / self.scale, h[t], total[t])
        return [vec_scale(1.0 / self.repeats, s) for s in total]


def make_solver(name, objective, damping, *, depth=1000, batch=10, repeats=1, scale=None, seed=0,
                cg_tol=1e-6, cg_maxiter=200, max_exact_params=10_000, progress=True):
    """Build the solver chosen by ``--solver``."""
    if name == "exact":
        return ExactSolver(objective, damping, max_params=max_exact_params, progress=progress)
    if name == "cg":
        return CGSolver(objective, damping, tol=cg_tol, maxiter=cg_maxiter, progress=progress)
    if name == "lissa":
        return LissaSolver(objective, damping, depth=depth, batch=batch, repeats=repeats, scale=scale,
                           seed=seed, progress=progress)
    raise UserError(f"unknown --solver {name!r}: choose lissa, cg or exact")
