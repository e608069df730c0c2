"""``--solver lissa``: the stochastic recursion of Agarwal et al. used by Koh & Liang::

    h_0 = v;   h_j = v + h_{j-1} − (H̃_j h_{j-1} + λ h_{j-1}) / s;   result = mean_r h_T / s

``H̃_j`` is the Hessian of ``mean L + Ω`` on ``b`` images drawn uniformly from the whole training
archive, ``s`` the scale, ``T`` the depth, ``r`` the repeats. The fixed point is ``(H + λI)⁻¹ v``;
it converges when ``s > λ_max(H + λI)`` and ``H + λI`` is positive definite.

Each test vector draws its minibatches from its own random stream, seeded by ``--seed`` and the
vector's id (test folder, label, index), so its result does not depend on which other images
share the run. The auto scale (power iteration) is training-set work and is cached.
"""
import logging
import math

import numpy as np
import tensorflow as tf

from influence.curvature.base import InverseHVP, stable_seed
from influence.errors import SettingError, UserError
from influence.model.hvp import numpy_to_vec, vec_axpy, vec_dot, vec_norm, vec_scale, vec_size
from influence.progress import progress as progress_bar

log = logging.getLogger(__name__)

#: images and tolerance of the whole-sample power iteration behind the auto scale (BENCHMARKS.md:
#: 256 images at 1e-3 land within 3 % of 1 024 images at 1e-4, well inside the 1.1 margin)
LAMBDA_SAMPLE = 256
LAMBDA_TOL = 1e-3
LAMBDA_ITERS = 60


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


class LissaSolver(InverseHVP):
    """LiSSA (see the module docstring). ``scale=None`` means 1.1 × estimated λ_max(H + λI)."""

    name = "lissa"
    summary = "stochastic recursion of Koh & Liang (-i depth, -b minibatch; any model size)"
    approximates = "hessian"   # what the contract test (tests/test_curvature_contract.py) compares with
    relative_damping = "trace"   # λ = factor × trace(H)/P (influence.curvature.damping)

    def __init__(self, objective, damping, iter=1000, bsize=10, repeats=1, scale=None, seed=0,
                 lambda_sample=LAMBDA_SAMPLE, progress=True):
        super().__init__(objective, damping, progress)
        depth, batch = iter, bsize
        for setting, value in (("iter", depth), ("bsize", batch), ("repeats", repeats)):
            if value < 1:
                raise SettingError(setting, f"LiSSA needs >= 1, got {value}")
        if scale is not None and scale <= 0:
            raise SettingError("scale", f"must be > 0, got {scale}")
        self.depth, self.batch, self.repeats = int(depth), int(batch), int(repeats)
        self.seed = int(seed)
        self.lambda_sample = int(lambda_sample)
        self.scale = None if scale is None else float(scale)
        self.info.update(depth=self.depth, batch=self.batch, repeats=self.repeats)
        if self.scale is not None:
            self.info.update(scale=self.scale)
        d = objective.d
        self._step = tf.function(self._step_fn, input_signature=[d.x_spec, d.y_spec, d.vec_spec, d.vec_spec])

    # --- the auto scale: training-set work, cached -----------------------------------------------
    def cache_key(self):
        damping = str(self.damping_spec) if self.damping_spec.relative else self.damping
        return {"damping": damping, "bsize": self.batch, "seed": self.seed, "lambda_sample": self.lambda_sample,
                **self.matrix_key()}

    def fit(self):
        if self.scale is not None:
            return
        lam, it = estimate_lambda_max(self.obj, self.damping, sample=self.lambda_sample, iters=LAMBDA_ITERS,
                                      tol=LAMBDA_TOL, seed=self.seed)
        lam_b = self._minibatch_lambda_max(self.seed)
        self._set_scale(lam, lam_b, it)

    def _set_scale(self, lam, lam_b, iterations):
        self.scale = 1.1 * max(lam, lam_b)
        self.info.update(lambda_max=lam, lambda_iterations=iterations, lambda_max_minibatch=lam_b, scale=self.scale)
        log.info("LiSSA scale: auto = 1.1 x λ_max(H + λI) = 1.1 x %.4g = %.4g (power iteration: %.4g on %d "
                 "images, %.4g on minibatches of %d)", max(lam, lam_b), self.scale, lam,
                 min(self.lambda_sample, self.obj.n), lam_b, self.batch)

    def state(self):
        if "lambda_max" not in self.info:
            return None       # a user-given scale: nothing learnt
        return {"lambda_max": np.float64(self.info["lambda_max"]),
                "lambda_max_minibatch": np.float64(self.info["lambda_max_minibatch"]),
                "lambda_iterations": np.int64(self.info["lambda_iterations"])}

    def load_state(self, arrays):
        if self.scale is not None:
            return
        self._set_scale(float(arrays["lambda_max"]), float(arrays["lambda_max_minibatch"]),
                        int(arrays["lambda_iterations"]))

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

    # --- per test vector -------------------------------------------------------------------------
    def _step_fn(self, x, y, v, h):
        """One recursion step; returns (h_new, ‖h_new‖²)."""
        d = self.obj.d
        dtype = d.dtype
        hv = self.obj.vp_graph(x, y, h, tf.cast(1.0 / tf.cast(tf.shape(y)[0], tf.float64), dtype),
                               tf.constant(1.0, dtype))
        inv_s = tf.constant(1.0 / self.scale, dtype)
        keep = tf.constant(1.0 - self.damping / self.scale, dtype)
        new = tuple(vi + keep * hi - inv_s * hvi for vi, hi, hvi in zip(v, h, hv))
        # the norm only feeds the progress bar and the divergence check: no float64 copies
        sq = tf.cast(tf.add_n([2.0 * tf.nn.l2_loss(t) for t in new]), tf.float64)
        return new, sq

    workspace_vectors = 3          # the running estimate, its HVP and the repeats' sum

    def solve(self, vectors, ids=None):
        vectors = list(vectors)
        if self.scale is None:
            self.fit()
        ids = list(range(len(vectors))) if ids is None else list(ids)
        return [self._solve_one(v, ident) for v, ident in zip(vectors, ids)]

    def _solve_one(self, v, ident):
        # When H + λI is positive definite with eigenvalues below 2s, every ‖(I - A/s)^k‖ ≤ 1, so
        # ‖h_j‖ ≤ (j + 1)·‖v‖, and ‖h_j‖ ≤ ‖v‖·s/λ_min(A) ≤ ‖v‖·s/λ when H ⪰ 0. Minibatch noise
        # gets a margin of 5; growing past that means negative curvature below -λ or s too small.
        norm_v = max(vec_norm(v), 1e-300)
        cap = self.scale / self.damping if self.damping > 0 else float("inf")
        rng = np.random.default_rng(stable_seed(self.seed, ident))
        n = self.obj.n
        total = vec_scale(0.0, v)
        for rep in range(self.repeats):
            h = tuple(v)
            desc = "LiSSA" if self.repeats == 1 else f"LiSSA {rep + 1}/{self.repeats}"
            with progress_bar(total=self.depth, desc=desc, unit="it", disable=not self.progress) as bar:
                for j in range(self.depth):
                    x, y = self.obj.archive.take(np.sort(rng.integers(0, n, self.batch)))
                    h, sq = self._step(x, y.astype(np.int64), v, h)
                    ratio = math.sqrt(float(sq)) / norm_v
                    if not np.isfinite(ratio) or (j >= 5 and ratio > 5.0 * min(j + 1, cap)):
                        raise UserError(
                            f"LiSSA diverged at step {j + 1} (‖h‖/‖v‖ = {ratio:.3g}): H + λI has negative "
                            f"curvature or the scale is too small; use a larger damping (now {self.damping:g}) "
                            f"or a larger scale (now {self.scale:.4g})"
                        )
                    bar.update(1)
                    if j % 10 == 0 or j == self.depth - 1:
                        bar.set_postfix(norm=f"{ratio * norm_v / self.scale:.4g}")  # ‖h_j / s‖: the estimate
            total = vec_axpy(1.0 / self.scale, h, total)
        return vec_scale(1.0 / self.repeats, total)
