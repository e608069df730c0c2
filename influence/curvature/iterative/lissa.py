"""``--solver lissa``: the stochastic recursion of Agarwal et al. used by Koh & Liang::

    h_0 = v;   h_j = v + h_{j-1} − (H̃_j h_{j-1} + λ h_{j-1}) / s;   result = mean_r h_T / s

``H̃_j`` is the Hessian of ``mean L + Ω`` on ``b`` images drawn uniformly from the whole training
archive, ``s`` the scale, ``T`` the depth, ``r`` the repeats. The fixed point is ``(H + λI)⁻¹ v``;
it converges when ``s > λ_max(H + λI)`` and ``H + λI`` is positive definite.

**Damping ``optimizer``** (per parameter, ``c·D`` read from the training run): ``λ h`` becomes
``c·D ⊙ h``, the fixed point ``(H + c·D)⁻¹ v``. Where a scalar λ enters a bound it is replaced by the
side of ``c·D`` that keeps the bound safe: ``λ_max(H + c·D) ≤ λ_max(H) + c·max D`` sets the auto scale,
``λ_min(H + c·D) ≥ c·min D`` the divergence cap and the depth estimate (:meth:`LissaSolver.damping_bounds`).

Each test vector draws its minibatches from its own random stream, seeded by ``--seed`` and the
vector's id (test folder, label, index), so its result does not depend on which other images
share the run. The auto scale (power iteration) is training-set work and is cached.

**Restarts.** Each step multiplies ``h`` by ``I − (H̃_j + λI)/s``, which expands when a minibatch's
λ_max exceeds ``2s``. Per-minibatch curvature is heavy-tailed (README: 20 minibatches of 10 of the
demo CNN had a median λ_max of 0.27 and a maximum of 37), so the four minibatches behind the auto
scale can miss the ones that blow a recursion up. When ``‖h_j‖`` grows past what a stable recursion allows, that
recursion is restarted from ``h_0 = v`` (and the start of its random stream) with a larger scale,
logged with one warning and recorded in ``info["restarts"]``; after :data:`MAX_RESTARTS` restarts it
stops with a :class:`UserError` naming the damping and the scale (negative curvature below ``−λ``,
``--hessian full``, is not cured by any scale).

*How much larger.* Since ``h_j − v = (I − A_j/s) h_{j-1}`` (``A_j = H̃_j + λI``), every step gives the
lower bound ``‖I − A_j/s‖ ≥ γ_j = (‖h_j‖ − ‖v‖) / ‖h_{j-1}‖``, and ``γ > 1`` with ``A_j ≻ 0`` means
``λ_max(A_j) ≥ s (1 + γ)``. A restart takes the auto rule (1.1 × the largest λ_max seen) with that bound:
``s ← s · 1.1 (1 + max_j γ_j)``, clipped to a factor of 2 … 100 (at least a doubling, so
:data:`MAX_RESTARTS` restarts span ≥ 16 ×; a non-finite norm takes 100). A fixed factor (4) would
either restart several times on a heavy minibatch (λ_max = 20 s: two restarts to stop expanding,
three to reach 1.1 λ_max) or, set larger, inflate the scale more than needed, and a larger scale
costs accuracy at a fixed depth (below).

*Which scale later vectors start from.* Carrying one vector's escalated scale over to the vectors
solved after it would make a result depend on which other images share the run (``--folders``,
``--limit``, ``--memory-budget``, a resume), which this solver promises it does not. So the rule is:
(1) with the auto scale, :meth:`LissaSolver.fit` runs one *probe* recursion, of the run's depth ``T``, on
a fixed training-set vector (the summed loss gradient of the power iteration's sample) with its own
seeded stream, restarting as above; the scale it ends with is the fitted scale ``self.scale``
(``info["scale"]``; ``info["scale_auto"]`` is the power-iteration value), a function of the training
set and the settings only, cached with the rest of the fit (the cache key holds ``T``); (2) every test
vector starts from that scale and, should its own stream still diverge, restarts on its own, without
changing the scale of any other vector. A run pays the probe's restarts once (once per cache), and
test vectors restart only where their own minibatches are worse than the probe's. The probe costs
one recursion of depth ``T`` at fit time (one test image's worth). A given ``--scale`` is used as it
is, without a probe: every vector then restarts on its own where it needs to.
``info["scale_max"]`` is the largest scale a vector of the run ended with.

**Depth for a larger scale.** Each step contracts the error by ``1 − λ_min(H + λI)/s ≤ 1 − λ/s``, so
reaching a relative error ε takes ``T ≈ (s / λ_min(H + λI)) · ln(1/ε) ≤ (s/λ) · ln(1/ε)`` steps
(ε = 1 %: ``4.6 s/λ``): a restart that multiplies ``s`` by ``f`` multiplies the depth needed by ``f``.
Short of that, directions with curvature below ``s/T`` are returned as about ``(T/s) v`` (the series
truncated: like extra damping ``s/T``), so at a fixed ``-i`` a larger scale shrinks those components.
On the demo CNN (λ = 3.7e-5 from ``--damping auto``, s = 2 … 4) 1 % takes 2.6e5 … 4.7e5 steps:
``-i 1000`` is far from converged at any of these scales, and every restart's factor widens the gap.
"""
import logging
import math

import numpy as np
import tensorflow as tf

from influence.curvature.base import InverseHVP, stable_seed
from influence.errors import SettingError, UserError
from influence.model.vectors import numpy_to_vec, vec_axpy, vec_dot, vec_norm, vec_scale, vec_size
from influence.progress import progress as progress_bar

log = logging.getLogger(__name__)

#: images and tolerance of the whole-sample power iteration behind the auto scale (BENCHMARKS.md:
#: 256 images at 1e-3 land within 3 % of 1 024 images at 1e-4, well inside the 1.1 margin)
LAMBDA_SAMPLE = 256
LAMBDA_TOL = 1e-3
LAMBDA_ITERS = 60
#: restarts with a larger scale one recursion may take before LiSSA gives up (module docstring)
MAX_RESTARTS = 4
#: the auto rule's margin: scale = MARGIN × the largest λ_max(H̃ + λI) known
MARGIN = 1.1
#: bounds of the factor one restart multiplies the scale by
MIN_FACTOR, MAX_FACTOR = 2.0, 100.0
#: the id of the scale probe's random stream (test ids are (folder, label, index) and the like)
PROBE_ID = ("lissa scale probe",)


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


def _sample(n, sample, seed):
    """The power iteration's training images: ``sample`` of the ``n`` (all when fewer), sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(sample, n), replace=False))


def estimate_lambda_max(objective, damping, sample=1024, iters=100, tol=1e-4, seed=0):
    """λ_max(H + λI) by power iteration on HVPs over ``sample`` training images (all when fewer)."""
    idx = _sample(objective.n, sample, seed)
    mu, it = power_iteration(lambda v: objective.hvp_full(v, idx), objective.d.variables, iters, tol, seed)
    return abs(mu) + damping, it


def restart_factor(growth):
    """What a restart multiplies the scale by, from the largest per-step growth bound ``γ`` seen
    (module docstring): ``1.1 (1 + γ)`` clipped to [2, 100]; 100 when ``γ`` is not finite."""
    if not np.isfinite(growth):
        return MAX_FACTOR
    return float(min(MAX_FACTOR, max(MIN_FACTOR, MARGIN * (1.0 + growth))))


class _Diverged:
    """One recursion that grew past its bound: at ``step`` (1-based), ``‖h‖/‖v‖ = ratio``, with the
    largest per-step growth bound ``growth`` (γ) seen."""

    def __init__(self, step, ratio, growth):
        self.step, self.ratio, self.growth = step, ratio, growth


class LissaSolver(InverseHVP):
    """LiSSA (see the module docstring). ``scale=None`` means 1.1 × estimated λ_max(H + λI), raised
    by a probe recursion where that diverges; a given scale is used as it is. Any recursion that
    diverges restarts with a larger scale, at most :data:`MAX_RESTARTS` times."""

    name = "lissa"
    summary = "stochastic recursion of Koh & Liang (-i depth, -b minibatch; any model size)"
    approximates = "hessian"   # what the contract test (tests/test_curvature_contract.py) compares with
    relative_damping = "trace"   # λ = factor × trace(H)/P (influence.curvature.damping)
    takes_diagonal = True        # damping optimizer: every step damps by c·D ⊙ h (module docstring)

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
        self.info.update(depth=self.depth, batch=self.batch, repeats=self.repeats, restarts=[])
        if self.scale is not None:
            self.info.update(scale=self.scale)
        d = objective.d
        scalar = tf.TensorSpec((), d.dtype)
        # the scale enters as arguments (1/s, 1 − λ/s): a restart changes it without a retrace
        #: one compiled recursion step ``(x, y, v, h, 1/s, 1 − λ/s) -> (h_new, ‖h_new‖²)`` (:meth:`_step_fn`);
        #: with damping ``optimizer`` its twin takes ``1 − c·D/s`` as a Vec
        self.step = tf.function(self._step_fn, input_signature=[d.x_spec, d.y_spec, d.vec_spec, d.vec_spec,
                                                                 scalar, scalar])
        self.step_diagonal = tf.function(self._step_fn, input_signature=[d.x_spec, d.y_spec, d.vec_spec,
                                                                          d.vec_spec, scalar, d.vec_spec])

    def damping_bounds(self):
        """``(smallest, largest)`` damping of any direction: ``(λ, λ)``, or ``(c·min D, c·max D)`` with damping
        ``optimizer`` (module docstring)."""
        diagonal = self.response_diagonal()
        if diagonal is None:
            return self.damping, self.damping
        c = self.damping_spec.value
        return c * float(diagonal.min()), c * float(diagonal.max())

    def _keep(self, scale):
        """The step's ``1 − λ/s`` (a scalar tensor), or ``1 − c·D/s`` (a Vec) with damping ``optimizer``."""
        dtype = self.obj.d.dtype
        diagonal = self.response_diagonal()
        if diagonal is None:
            return tf.constant(1.0 - self.damping / scale, dtype)
        return numpy_to_vec(1.0 - self.damping_spec.value * diagonal / scale, self.obj.d.variables)

    # --- the auto scale: training-set work, cached -----------------------------------------------
    def cache_key(self):
        spec = self.damping_spec
        damping = str(spec) if spec.relative or spec.optimizer else self.damping
        return {"damping": damping, "bsize": self.batch, "seed": self.seed, "lambda_sample": self.lambda_sample,
                "scale_probe": {"depth": self.depth, "max_restarts": MAX_RESTARTS}, **self.matrix_key()}

    def fit(self, sums=None):
        if self.scale is not None:
            return
        lam, it = estimate_lambda_max(self.obj, self.damping_bounds()[1], sample=self.lambda_sample,
                                      iters=LAMBDA_ITERS, tol=LAMBDA_TOL, seed=self.seed)
        lam_b = self._minibatch_lambda_max(self.seed)
        self._set_scale(lam, lam_b, it)
        self._probe()

    def _set_scale(self, lam, lam_b, iterations):
        self.scale = MARGIN * max(lam, lam_b)
        self.info.update(lambda_max=lam, lambda_iterations=iterations, lambda_max_minibatch=lam_b, scale=self.scale,
                         scale_auto=self.scale)
        log.info("LiSSA scale: auto = 1.1 x λ_max(H + λI) = 1.1 x %.4g = %.4g (power iteration: %.4g on %d "
                 "images, %.4g on minibatches of %d)", max(lam, lam_b), self.scale, lam,
                 min(self.lambda_sample, self.obj.n), lam_b, self.batch)

    def _probe(self):
        """One recursion of depth T on a fixed training-set vector; the scale it survives with is the
        fitted scale (module docstring). Raises the divergence UserError when no scale tried survives."""
        idx = _sample(self.obj.n, self.lambda_sample, self.seed)
        v = None
        for start in range(0, len(idx), self.obj.chunk):
            x, y = self.obj.archive.take(idx[start:start + self.obj.chunk])
            g = self.obj.d.gradient(x, y.astype(np.int64))
            v = g if v is None else tuple(a + b for a, b in zip(v, g))
        auto = self.scale
        _, scale, restarts = self._escalate(v, PROBE_ID, auto, "the scale probe", "LiSSA scale probe")
        self.scale = scale
        self.info.update(scale=scale, probe_restarts=restarts)
        if restarts:
            low = self.damping_bounds()[0]
            log.info("LiSSA scale: %.4g after the probe's %d restart(s) (auto %.4g); every test vector starts "
                     "from it; convergence to 1 %% needs about %.3g steps (4.6 s/λ; -i is %d)",
                     scale, restarts, auto, 4.6 * scale / low if low else float("inf"), self.depth)

    def state(self):
        if "lambda_max" not in self.info:
            return None       # a user-given scale: nothing learnt
        return {"lambda_max": np.float64(self.info["lambda_max"]),
                "lambda_max_minibatch": np.float64(self.info["lambda_max_minibatch"]),
                "lambda_iterations": np.int64(self.info["lambda_iterations"]),
                "scale": np.float64(self.scale), "probe_restarts": np.int64(self.info["probe_restarts"])}

    def load_state(self, arrays):
        if self.scale is not None:
            return
        self._set_scale(float(arrays["lambda_max"]), float(arrays["lambda_max_minibatch"]),
                        int(arrays["lambda_iterations"]))
        self.scale = float(arrays["scale"])
        self.info.update(scale=self.scale, probe_restarts=int(arrays["probe_restarts"]))
        if self.scale != self.info["scale_auto"]:
            log.info("LiSSA scale: %.4g, raised by the cached probe's %d restart(s)", self.scale,
                     self.info["probe_restarts"])

    def _minibatch_lambda_max(self, seed, batches=4):
        """Largest λ_max(H̃ + λI) over a few random minibatches of size b.

        Each recursion step multiplies by (I - (H̃_j + λI)/s); it stays a contraction only while
        every minibatch Hessian's eigenvalues are below 2s. Small minibatches have much larger
        curvature than the whole set (the demo CNN: 0.28 on 1500 images, several times that on
        32), so a scale from the whole set alone lets the recursion blow up.
        """
        rng = np.random.default_rng(seed + 1)
        worst, top = 0.0, self.damping_bounds()[1]
        for _ in range(batches):
            idx = np.sort(rng.integers(0, self.obj.n, self.batch))
            x, y = self.obj.archive.take(idx)
            y = y.astype(np.int64)
            mu, _ = power_iteration(lambda v: self.obj.hvp_minibatch(v, x, y), self.obj.d.variables,
                                    iters=30, tol=1e-3, seed=seed)
            worst = max(worst, abs(mu) + top)
        return worst

    # --- per test vector -------------------------------------------------------------------------
    def _step_fn(self, x, y, v, h, inv_s, keep):
        """One recursion step at ``inv_s = 1/s``, ``keep = 1 − λ/s`` (a scalar, or per parameter ``1 − c·D/s``
        as a Vec); returns (h_new, ‖h_new‖²)."""
        d = self.obj.d
        dtype = d.dtype
        hv = self.obj.vp_graph(x, y, h, tf.cast(1.0 / tf.cast(tf.shape(y)[0], tf.float64), dtype),
                               tf.constant(1.0, dtype))
        keeps = keep if isinstance(keep, (tuple, list)) else (keep,) * len(h)
        new = tuple(vi + ki * hi - inv_s * hvi for vi, ki, hi, hvi in zip(v, keeps, h, hv))
        # the norm only feeds the progress bar and the divergence check: no float64 copies
        sq = tf.cast(tf.add_n([2.0 * tf.nn.l2_loss(t) for t in new]), tf.float64)
        return new, sq

    @property
    def workspace_vectors(self):
        """The running estimate, its HVP, the repeats' sum, and with damping ``optimizer`` ``1 − c·D/s``."""
        return 4 if self.damping_spec.optimizer else 3

    def solve(self, vectors, ids=None):
        vectors = list(vectors)
        if self.scale is None:
            self.fit()
        ids = list(range(len(vectors))) if ids is None else list(ids)
        return [self._solve_one(v, ident) for v, ident in zip(vectors, ids)]

    def _solve_one(self, v, ident):
        result, scale, _ = self._escalate(v, ident, self.scale, f"test vector {ident}", "LiSSA")
        self.info["scale_max"] = max(scale, self.info.get("scale_max", scale))
        return result

    def _escalate(self, v, ident, scale, what, desc):
        """The recursion of ``v`` from ``scale``, restarted with a larger scale after each divergence
        (module docstring) -> ``(result, the scale it survived with, restarts)``."""
        tried = []
        while True:
            out = self._recursion(v, ident, scale, desc)
            if not isinstance(out, _Diverged):
                return out, scale, len(tried)
            tried.append(scale)
            if len(tried) > MAX_RESTARTS:
                scales = ", ".join(f"{s:.4g}" for s in tried)
                raise UserError(
                    f"LiSSA diverged at step {out.step} (‖h‖/‖v‖ = {out.ratio:.3g}) on {what} after "
                    f"{MAX_RESTARTS} restart(s) with larger scales (tried {scales}): H + λI has negative "
                    f"curvature or the scale is still too small; use a larger damping (now {self.damping_spec}) "
                    f"or a larger scale (now {scale:.4g})")
            new = scale * restart_factor(out.growth)
            log.warning("LiSSA: %s diverged at step %d of %d (‖h‖/‖v‖ = %.3g): restarting it from h_0 = v with "
                        "scale %.4g (was %.4g; restart %d of at most %d)", what, out.step, self.depth, out.ratio,
                        new, scale, len(tried), MAX_RESTARTS)
            self.info["restarts"].append({"id": str(ident), "step": out.step, "scale_from": scale, "scale_to": new})
            scale = new

    def _recursion(self, v, ident, scale, desc):
        """All repeats of the recursion of ``v`` at ``scale``, from the start of the vector's stream:
        their mean ``h_T / s``, or a :class:`_Diverged`."""
        # When H + λI is positive definite with eigenvalues below 2s, every ‖(I - A/s)^k‖ ≤ 1, so
        # ‖h_j‖ ≤ (j + 1)·‖v‖, and ‖h_j‖ ≤ ‖v‖·s/λ_min(A) ≤ ‖v‖·s/λ when H ⪰ 0. Minibatch noise
        # gets a margin of 5; growing past that means negative curvature below -λ or s too small.
        low = self.damping_bounds()[0]
        norm_v = max(vec_norm(v), 1e-300)
        cap = scale / low if low > 0 else float("inf")
        dtype = self.obj.d.dtype
        inv_s, keep = tf.constant(1.0 / scale, dtype), self._keep(scale)
        step = self.step_diagonal if isinstance(keep, tuple) else self.step
        rng = np.random.default_rng(stable_seed(self.seed, ident))
        n = self.obj.n
        total = vec_scale(0.0, v)
        growth = 0.0          # max_j γ_j, γ_j = (‖h_j‖ − ‖v‖)/‖h_{j-1}‖ ≤ ‖I − A_j/s‖ (module docstring)
        for rep in range(self.repeats):
            h = tuple(v)
            previous = 1.0    # ‖h_{j-1}‖/‖v‖
            label = desc if self.repeats == 1 else f"{desc} {rep + 1}/{self.repeats}"
            with progress_bar(total=self.depth, desc=label, unit="it", disable=not self.progress) as bar:
                for j in range(self.depth):
                    x, y = self.obj.archive.take(np.sort(rng.integers(0, n, self.batch)))
                    h, sq = step(x, y.astype(np.int64), v, h, inv_s, keep)
                    ratio = math.sqrt(float(sq)) / norm_v
                    growth = max(growth, (ratio - 1.0) / previous) if np.isfinite(ratio) else float("inf")
                    previous = max(ratio, 1e-300)
                    if not np.isfinite(ratio) or (j >= 5 and ratio > 5.0 * min(j + 1, cap)):
                        return _Diverged(j + 1, ratio, growth)
                    bar.update(1)
                    if j % 10 == 0 or j == self.depth - 1:
                        bar.set_postfix(norm=f"{ratio * norm_v / scale:.4g}")  # ‖h_j / s‖: the estimate
            total = vec_axpy(1.0 / scale, h, total)
        return vec_scale(1.0 / self.repeats, total)
