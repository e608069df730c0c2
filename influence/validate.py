"""Leave-one-out check of the scores (Koh & Liang 2017, Figure 2): ``python -m influence.validate``.

For a few held-out digits ("test images") we score every training image, take the ``--top`` most
influential ones (largest ``|score|``) plus ``--random`` others, retrain without each of them, and
compare the *predicted* change of the test loss with the *actual* one.

Sign and scale (docs/DESIGN.md): ``score(i, t) = ∇L(z_t)ᵀ (H + λI)⁻¹ ∇L(z_i)``, so removing ``z_i``
changes the loss of test image ``t`` by about ``+score / n``. That is the first-order change when the
image's weight in ``R(θ) = (1/n) Σ_j L(z_j) + Ω(θ)`` goes from ``1/n`` to ``0`` (upweighting by
``ε = −1/n``). The retraining here uses exactly that objective, ``(1/n) Σ_{j≠i} L(z_j) + Ω``. A mean
over the ``n − 1`` remaining images would also weaken ``Ω`` relative to the data by ``(n−1)/n``; at a
regularised optimum that moves every retrained model the same way and adds (to first order) the
same ``s_tᵀ∇Ω(θ̂)/(n−1)`` (``s_t = (H+λI)⁻¹∇L(z_t)``) to every actual change of test image ``t``. It
is logged, not mixed in.

Panels (``--panels``):

* ``convex`` -- softmax regression (Flatten → Dense(10) logits, float64, L2 on kernel and bias; the
  bias term is regularised too, so that the softmax's shift invariance leaves no flat direction) on
  the 8×8 digits, fitted to its optimum by Newton's method, scored with ``--solver exact``, retrained
  without each image to the optimum by Newton iterations from a warm start;
* ``lissa`` -- the same model and retrained optima, scored with LiSSA (scale auto);
* ``ekfac`` -- the convex model and retrained optima, scored with ``--solver ekfac`` (``--ekfac-fisher``,
  default sampled; λ = 0: the L2 on kernel and bias keeps it invertible); also compared with the exact scores
  (Pearson over every training image and test image);
* ``cnn`` -- the small CNN of :mod:`influence.demo` (float32), trained with its own recipe; the
  "retraining" is a fixed recipe from the trained weights (``K`` full-batch gradient steps with step
  ``η = 1/λ_max``) and the actual change is measured against the SAME recipe on the full training set,
  so whatever the recipe does anyway (the trained CNN is not at an optimum) cancels. ``K`` gradient
  steps move a direction of curvature ``h`` by ``(1 − (1 − ηh)^K)/h`` instead of ``1/h``, which is
  capped at ``ηK``: the recipe cannot follow curvature below about ``1/(ηK)``, which acts like a
  damping. ``--cnn-damping auto`` uses exactly ``λ = 1/(ηK) = λ_max/K``;
* ``cnn-ekfac`` -- the same CNN, recipe and damping, scored with ``--solver ekfac``; compared with the
  cg scores too when the ``cnn`` panel runs alongside.

Test images are the held-out digits with the largest loss under the trained model (where the
question "which training images did this" is asked; their gradients are large enough for the
actual changes to stand out of the arithmetic noise).

The command prints one line per panel (Pearson, Spearman, settings, seconds) and writes a scatter
figure (predicted on x, actual on y, the diagonal, r in the title). Exit code 1 when a panel misses
its goal (convex 0.99, lissa 0.95, cnn 0.86, ekfac 0.93 and 0.88 against the exact scores; cnn-ekfac
has none: EK-FAC on a CNN is reported, not promised).

``mislabel`` (not in the default set; ``--panels mislabel``), after Koh & Liang Fig. 6: flip the
labels of 10 % of the demo's 1500 training digits (seeded; each to another class drawn uniformly),
train the demo CNN on them with the demo's recipe, then check the training images in the order of
self-influence (``--solver ekfac``, ``--mislabel-damping``, default 0.01 as calculate.py), of
training loss, and at random. Its figure (fraction of the flipped images found against the fraction
of the training set checked) goes to ``--mislabel-out``. Goal: at 10 % checked, self-influence
finds at least as many as the loss ranking and at least 3x random (random finds 10 % on average).

``lds`` (not in the default set; ``--panels lds``): the linear datamodeling score of every solver against the
demo CNN retrained on random half-subsets (``--lds-subsets``, ``--lds-seeds``, cached in ``--lds-cache``);
all of it lives in :mod:`influence.experiments.lds`. Reported, not promised.
"""
import argparse
import dataclasses
import logging
import math
import sys
import time

import numpy as np

log = logging.getLogger(__name__)

PANELS = ("convex", "lissa", "cnn", "ekfac", "cnn-ekfac", "mislabel", "lds")
DEFAULT_PANELS = "convex,lissa,cnn,ekfac"
GOALS = {"convex": 0.99, "lissa": 0.95, "cnn": 0.86, "ekfac": 0.93}
#: goals of a panel's Pearson against the scores of its reference solver
REFERENCE_GOALS = {"ekfac": 0.88}
#: fractions of the training set checked at which the mislabel panel reports what it found
CHECKED = (0.05, 0.10, 0.20)


# ----------------------------------------------------------------------------- statistics

def pearson(a, b):
    """Pearson correlation of two 1-D arrays (nan when either is constant)."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    den = math.sqrt(float(np.dot(a, a)) * float(np.dot(b, b)))
    return float(np.dot(a, b) / den) if den > 0 else float("nan")


def rankdata(a):
    """Ranks 1..N of a 1-D array, ties getting the mean of their ranks (like scipy's 'average')."""
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # start of each run of equal values
    new = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [len(a)]])
    mean_rank = (starts + ends - 1) / 2.0 + 1.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(a, b):
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    return pearson(rankdata(a), rankdata(b))


# ----------------------------------------------------------------------------- data

class ArrayArchive:
    """In-memory training images with the ``len`` / ``take`` interface of a TrainArchive."""

    def __init__(self, x, y):
        self.x = np.asarray(x)
        self.y = np.asarray(y, dtype=np.int64)

    def __len__(self):
        return len(self.y)

    def take(self, indices):
        idx = np.asarray(indices)
        return self.x[idx], self.y[idx]


def digit_arrays(size, channels, n_train, seed=0, resample="nearest"):
    """Bundled digits as uint8 (N, size, size, channels): ``(x_train, y_train, x_held, y_held)``."""
    from influence.data import digits

    images, target = digits.load_digits()
    train_idx, held_idx = digits.split(target, seed=seed, n_test=len(target) - n_train)
    rgb = digits.to_rgb(images, size, resample=resample)[..., :channels]
    return rgb[train_idx], target[train_idx], rgb[held_idx], target[held_idx]


# ----------------------------------------------------------------------------- problems

class Problem:
    """A trained model with its data, the engine around it, and leave-one-out retraining.

    Subclasses set ``self.model`` (Keras, logits out), ``self.clf``, the arrays, and implement
    :meth:`_retrain` (-> test losses after retraining without image ``i``).
    ``self.base_losses`` are the test losses the actual changes are measured from.
    """

    name = "problem"

    def _setup_engine(self, image_shape, chunk):
        import tensorflow as tf

        from influence.model.hvp import Derivatives, TrainingObjective
        from influence.scoring import Scorer

        self.archive = ArrayArchive(self.x_train, self.y_train)
        self.n = len(self.archive)
        self.derivs = Derivatives(self.clf, image_shape)
        self.objective = TrainingObjective(self.derivs, self.archive, chunk=chunk)
        self.scorer = Scorer(self.derivs)
        self.chunk = chunk
        dtype = self.clf.dtype
        self.variables = list(self.model.trainable_variables)
        x_spec = tf.TensorSpec((None,) + tuple(image_shape), tf.uint8)
        y_spec = tf.TensorSpec((None,), tf.int64)
        w_spec = tf.TensorSpec((None,), dtype)
        self._loss_fn = tf.function(self._losses_graph, input_signature=[x_spec, y_spec])
        self._grad_fn = tf.function(self._weighted_gradient_graph, input_signature=[x_spec, y_spec, w_spec])
        self._retrained = {}

    # independent of the engine: the Keras model's own forward pass and regularisers
    def _losses_graph(self, x, y):
        import tensorflow as tf

        logits = self.model(tf.cast(self.clf.preprocess(x), self.clf.dtype), training=False)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    def _weighted_gradient_graph(self, x, y, w):
        """∇[Σ_j w_j L(z_j) + Ω] over the model's trainable variables -> list of tensors."""
        import tensorflow as tf

        values = [v.value for v in self.variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            obj = tf.reduce_sum(w * self._losses_graph(x, y))
            for v in self.variables:
                if getattr(v, "regularizer", None) is not None:
                    obj = obj + tf.cast(v.regularizer(v.value), obj.dtype)
        return tape.gradient(obj, values)

    def weights(self, drop=None):
        """Per-image weights of the training objective: 1/n each, 0 for the dropped image."""
        w = np.full(self.n, 1.0 / self.n, dtype=self.clf.dtype.as_numpy_dtype)
        if drop is not None:
            w[drop] = 0.0
        return w

    def get_theta(self):
        return [np.array(v.numpy()) for v in self.variables]

    def set_theta(self, theta):
        for v, t in zip(self.variables, theta):
            v.assign(t)

    def test_losses(self):
        return self._loss_fn(self.x_test, self.y_test).numpy().astype(np.float64)

    def pick_tests(self, count):
        """The ``count`` held-out images with the largest loss under the trained model."""
        losses = self._loss_fn(self.x_held, self.y_held).numpy()
        order = np.argsort(-losses, kind="mergesort")[:count]
        self.test_ids = order
        self.x_test, self.y_test = self.x_held[order], self.y_held[order]
        log.info("%s: test images = held-out #%s, losses %s", self.name, order.tolist(),
                 np.array2string(losses[order], precision=3))

    def actual_change(self, i):
        """Change of every test image's loss when training image ``i`` is left out (cached)."""
        if i not in self._retrained:
            theta = self.get_theta()
            try:
                self._retrained[i] = self._retrain(i) - self.base_losses
            finally:
                self.set_theta(theta)
        return self._retrained[i]

    def scores(self, solver):
        """(T, n) scores of every training image for every test image, and the s_t vectors."""
        x_t, y_t = self.x_test, self.y_test
        grads = [self.derivs.gradient(x_t[k:k + 1], y_t[k:k + 1]) for k in range(len(y_t))]
        s = solver.solve(grads)
        parts = []
        for start in range(0, self.n, self.chunk):
            x, y = self.archive.take(np.arange(start, min(start + self.chunk, self.n)))
            parts.append(self.scorer.shares_for(x, y, s).sum(axis=-1))
        return np.concatenate(parts, axis=1), s

    def regulariser_offset(self, s):
        """s_tᵀ∇Ω(θ̂)/(n−1) per test image: what a mean over n−1 images would add (module doc)."""
        from influence.model.hvp import vec_to_numpy

        w0 = np.zeros(self.n, dtype=self.clf.dtype.as_numpy_dtype)
        g_omega = np.concatenate([np.asarray(g, dtype=np.float64).ravel()
                                  for g in self._grad_fn(self.x_train[:1], self.y_train[:1], w0[:1])])
        return np.array([float(vec_to_numpy(v) @ g_omega) for v in s]) / (self.n - 1)


class ConvexProblem(Problem):
    """Softmax regression with L2, float64, fitted to its optimum by Newton's method."""

    name = "convex"

    def __init__(self, l2=1e-3, n_train=1500, size=8, tests=3, seed=0, grad_tol=1e-11):
        import keras

        from influence.model.models import Classifier, make_preprocess, select_params

        self.l2 = float(l2)
        self.grad_tol = float(grad_tol)
        self.x_train, self.y_train, self.x_held, self.y_held = digit_arrays(size, 1, n_train, seed)
        reg = keras.regularizers.L2(self.l2)
        self.model = keras.Sequential([
            keras.Input((size, size, 1), dtype="float64"),
            keras.layers.Flatten(dtype="float64"),
            keras.layers.Dense(10, dtype="float64", kernel_regularizer=reg, bias_regularizer=reg, name="softmax"),
        ], name="softmax_regression")
        self.model.layers[-1].kernel.assign(np.zeros((size * size, 10)))
        self.clf = Classifier(self.model, make_preprocess("unit"), select_params(self.model, "all"),
                              description="softmax regression")
        self._setup_engine((size, size, 1), chunk=4096)
        # features exactly as the model sees them (float32 x/255, then float64) plus a 1 for the bias
        feats = np.asarray(self.clf.preprocess(self.x_train), dtype=np.float64).reshape(self.n, -1)
        self.features = np.concatenate([feats, np.ones((self.n, 1))], axis=1)
        start = time.perf_counter()
        iters, gnorm = self._fit()
        self.fit_info = {"newton_iterations": iters, "grad_norm": gnorm, "seconds": time.perf_counter() - start}
        log.info("convex: softmax regression (%d parameters, L2 %g on kernel and bias) fitted by Newton in %d "
                 "iterations, ‖∇R‖ = %.2e", self.clf.num_params, self.l2, iters, gnorm)
        self.theta_hat = self.get_theta()
        self._h_inv = np.linalg.inv(self.hessian(self.weights()))
        self.pick_tests(tests)
        self.base_losses = self.test_losses()

    # --- flat parameter layout: Dense kernel (F, K) row-major then bias (K,) == features×classes
    def _flat(self, parts):
        return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])

    def _unflat(self, flat):
        k = self.variables[0].shape
        return [flat[:k[0] * k[1]].reshape(k), flat[k[0] * k[1]:]]

    def gradient(self, w):
        return self._flat(self._grad_fn(self.x_train, self.y_train, w))

    def objective_value(self, w):
        losses = self._loss_fn(self.x_train, self.y_train).numpy()
        reg = sum(float(v.regularizer(v.value)) for v in self.variables)
        return float(np.dot(w, losses)) + reg

    def hessian(self, w):
        """Dense ∇²[Σ w_j L_j + Ω] at the current weights, by hand (numpy), for Newton steps."""
        logits = self.model(np.asarray(self.clf.preprocess(self.x_train), dtype=np.float64)).numpy()
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        a = w[:, None, None] * (p[:, :, None] * np.eye(p.shape[1])[None] - p[:, :, None] * p[:, None, :])
        f = self.features
        n_f, n_k = f.shape[1], p.shape[1]
        h = np.empty((n_f, n_k, n_f, n_k))
        for k in range(n_k):
            for m in range(k, n_k):
                block = (f * a[:, k, m, None]).T @ f
                h[:, k, :, m] = block
                h[:, m, :, k] = block.T
        dim = n_f * n_k
        return h.reshape(dim, dim) + 2.0 * self.l2 * np.eye(dim)

    def _fit(self, max_iter=50):
        """Newton with backtracking from zero weights, to ‖∇R‖ ≤ grad_tol."""
        w = self.weights()
        theta = self._flat(self.get_theta())
        g = self.gradient(w)
        value = self.objective_value(w)
        for it in range(1, max_iter + 1):
            step = np.linalg.solve(self.hessian(w), g)
            t = 1.0
            while True:
                self.set_theta(self._unflat(theta - t * step))
                new_value = self.objective_value(w)
                if new_value <= value - 1e-4 * t * float(g @ step) or t < 1e-6:
                    break
                t *= 0.5
            theta, value = theta - t * step, new_value
            g = self.gradient(w)
            if np.linalg.norm(g) <= self.grad_tol:
                return it, float(np.linalg.norm(g))
        log.warning("convex: Newton stopped after %d iterations at ‖∇R‖ = %.2e", max_iter, np.linalg.norm(g))
        return max_iter, float(np.linalg.norm(g))

    def _retrain(self, i, max_iter=50):
        """Optimum of (1/n) Σ_{j≠i} L_j + Ω from θ̂: Newton-type steps with the inverse Hessian
        at θ̂ (the optimum only depends on the gradient being zero)."""
        w = self.weights(drop=i)
        theta = self._flat(self.theta_hat)
        for _ in range(max_iter):
            self.set_theta(self._unflat(theta))
            g = self.gradient(w)
            if np.linalg.norm(g) <= self.grad_tol:
                break
            theta = theta - self._h_inv @ g
        else:
            log.warning("convex: retraining without #%d stopped at ‖∇R‖ = %.2e", i, np.linalg.norm(g))
        return self.test_losses()


class CNNProblem(Problem):
    """The demo CNN (float32), trained by :func:`influence.demo.train_model`; the retraining recipe
    is ``steps`` full-batch gradient steps of size ``1/λ_max`` from the trained weights."""

    name = "cnn"

    def __init__(self, n_train=500, epochs=30, steps=30, tests=3, seed=0):
        from influence import demo
        from influence.model.models import Classifier, make_preprocess, select_params
        from influence.curvature.lissa import estimate_lambda_max

        self.x_train, self.y_train, self.x_held, self.y_held = digit_arrays(demo.SIZE, 3, n_train, seed,
                                                                            resample="bilinear")
        start = time.perf_counter()
        self.model, seconds = demo.train_model(self.x_train, self.y_train, epochs=epochs, seed=seed)
        self.clf = Classifier(self.model, make_preprocess("unit"), select_params(self.model, "all"),
                              description="demo CNN")
        self._setup_engine((demo.SIZE, demo.SIZE, 3), chunk=512)
        self.lambda_max, _ = estimate_lambda_max(self.objective, 0.0, sample=self.n, seed=seed)
        self.lr = 1.0 / self.lambda_max
        self.steps = int(steps)
        self.theta_hat = self.get_theta()
        g = np.sqrt(sum(float(np.sum(np.square(t))) for t in self._grad_fn(self.x_train, self.y_train,
                                                                           self.weights())))
        self.fit_info = {"train_seconds": seconds, "epochs": epochs, "grad_norm": g, "lambda_max": self.lambda_max}
        log.info("cnn: demo CNN (%d parameters) trained on %d images for %d epochs in %.1f s; ‖∇R‖ = %.2e "
                 "(not an optimum); λ_max(H) ≈ %.4g; recipe = %d full-batch steps of size 1/λ_max",
                 self.clf.num_params, self.n, epochs, seconds, g, self.lambda_max, self.steps)
        self.pick_tests(tests)
        self.base_losses = self._recipe(self.weights())
        self.noise = np.abs(self._recipe(self.weights()) - self.base_losses)
        self.set_theta(self.theta_hat)
        self.setup_seconds = time.perf_counter() - start
        log.info("cnn: the recipe on the full set moved the test losses by %s; repeating it differs by %.2g",
                 np.array2string(self.base_losses - self.test_losses_at(self.theta_hat), precision=4),
                 float(self.noise.max()))

    def test_losses_at(self, theta):
        self.set_theta(theta)
        return self.test_losses()

    def _recipe(self, w):
        import tensorflow as tf

        self.set_theta(self.theta_hat)
        w = tf.constant(w)
        for _ in range(self.steps):
            grads = self._grad_fn(self.x_train, self.y_train, w)
            for v, g in zip(self.variables, grads):
                v.assign_sub(self.lr * g)
        return self.test_losses()

    def _retrain(self, i):
        return self._recipe(self.weights(drop=i))


# ----------------------------------------------------------------------------- one panel

@dataclasses.dataclass
class PanelResult:
    name: str
    settings: str
    predicted: np.ndarray   # score / n
    actual: np.ndarray      # retrained test loss − base test loss
    test: np.ndarray        # which test image (0..T-1)
    train: np.ndarray       # which training image was removed
    kind: np.ndarray        # "top" or "random"
    seconds: float
    pearson: float = float("nan")
    spearman: float = float("nan")
    goal: float = float("nan")
    reference: str = ""                      # the solver whose scores these are compared with, if any
    reference_pearson: float = float("nan")  # Pearson of all scores against that solver's scores
    reference_goal: float = float("nan")

    def __post_init__(self):
        self.pearson = pearson(self.predicted, self.actual)
        self.spearman = spearman(self.predicted, self.actual)
        self.goal = GOALS.get(self.name, float("nan"))
        self.reference_goal = REFERENCE_GOALS.get(self.name, float("nan"))

    @property
    def ok(self):
        """The goals that are set are met (a panel without a goal is reported only)."""
        main = math.isnan(self.goal) or self.pearson >= self.goal
        ref = math.isnan(self.reference_goal) or self.reference_pearson >= self.reference_goal
        return bool(main and ref)


def choose_removals(scores, top, random, rng):
    """Training indices: the ``top`` largest |score| and ``random`` others (seeded)."""
    order = np.argsort(-np.abs(scores), kind="mergesort")
    chosen = order[:top]
    rest = order[top:]
    extra = rng.choice(rest, size=min(random, len(rest)), replace=False) if random > 0 else np.array([], int)
    return np.concatenate([chosen, extra]).astype(np.int64), ["top"] * len(chosen) + ["random"] * len(extra)


def run_panel(name, problem, solver, top, random, seed=0, settings="", scored=None):
    """Score, retrain without the chosen images, and compare. Returns a :class:`PanelResult`.

    ``scored``: ``problem.scores(solver)`` when the caller has it already.
    """
    start = time.perf_counter()
    scores, s = scored if scored is not None else problem.scores(solver)
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(scores.shape[0]):
        idx, kinds = choose_removals(scores[t], top, random, rng)
        for i, kind in zip(idx, kinds):
            rows.append((t, int(i), kind, scores[t, i] / problem.n))
    for k, (t, i, kind, pred) in enumerate(rows):
        problem.actual_change(i)
        if (k + 1) % 10 == 0 or k + 1 == len(rows):
            log.info("%s: retrained %d/%d", name, k + 1, len(rows))
    actual = np.array([problem.actual_change(i)[t] for t, i, _, _ in rows])
    result = PanelResult(
        name=name, settings=settings,
        predicted=np.array([r[3] for r in rows]), actual=actual,
        test=np.array([r[0] for r in rows]), train=np.array([r[1] for r in rows]),
        kind=np.array([r[2] for r in rows]), seconds=time.perf_counter() - start,
    )
    offset = problem.regulariser_offset(s)
    spread = float(np.std(result.predicted)) or 1.0
    log.info("%s: a mean over n-1 images would add %s to the actual changes (%.2g%% of the spread of the "
             "predictions); not used", name, np.array2string(offset, precision=3),
             100 * float(np.max(np.abs(offset))) / spread)
    for t in range(scores.shape[0]):
        m = result.test == t
        log.info("%s: test #%d: Pearson %.3f over %d removals", name, t, pearson(result.predicted[m],
                                                                                  result.actual[m]), int(m.sum()))
    rnd = result.kind == "random"
    if rnd.sum() >= 3:
        log.info("%s: random removals only: Pearson %.3f, median |actual| %.2g", name,
                 pearson(result.predicted[rnd], result.actual[rnd]), float(np.median(np.abs(result.actual[rnd]))))
    log.info("%s: Pearson %.4f, Spearman %.4f over %d removals (%.1f s)", name, result.pearson,
             result.spearman, len(rows), result.seconds)
    return result


# ----------------------------------------------------------------------------- figure

def plot(results, path):
    """Koh & Liang Fig. 2 style: one scatter per panel, predicted on x, actual on y, the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 5.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        colours = plt.get_cmap("tab10")
        for t in np.unique(r.test):
            for kind, marker in (("top", "o"), ("random", "x")):
                m = (r.test == t) & (r.kind == kind)
                if m.any():
                    ax.scatter(r.predicted[m], r.actual[m], s=22, marker=marker, color=colours(int(t) % 10),
                               alpha=0.8, linewidths=1.2,
                               label=f"test {t}, {kind}" if len(np.unique(r.test)) <= 4 else None)
        lo = float(min(r.predicted.min(), r.actual.min()))
        hi = float(max(r.predicted.max(), r.actual.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=1, ls="--", zorder=0)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
        ax.set_title(f"{r.name}: {r.settings}\nPearson r = {r.pearson:.3f}, Spearman ρ = {r.spearman:.3f}",
                     fontsize=9)
        ax.set_xlabel("predicted Δ test loss (score / n)")
        ax.set_ylabel("actual Δ test loss (retrained without z_i)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("leave-one-out: predicted vs retrained\n(o: top |score|, x: random)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ----------------------------------------------------------------------------- mislabelled images (Fig. 6)

def flip_labels(y, fraction, classes, seed):
    """Seeded label noise: ``round(fraction·N)`` images get another class, uniform over the other ones.

    Args:
      y: (N,) int labels in 0..classes-1; fraction in [0, 1]; classes >= 2; seed: int.

    Returns:
      ``(noisy (N,) int64, flipped (N,) bool)``; ``noisy != y`` exactly where ``flipped``.
    """
    y = np.asarray(y, np.int64)
    rng = np.random.default_rng(seed)
    count = int(round(fraction * len(y)))
    idx = rng.choice(len(y), size=count, replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, classes, size=count)) % classes
    flipped = np.zeros(len(y), bool)
    flipped[idx] = True
    return noisy, flipped


def fraction_found(order, flipped):
    """(N+1,) float: the fraction of all flipped images among the first ``k`` of ``order`` (N,), k = 0..N.

    ``flipped``: (N,) bool over the training images; ``order``: a permutation of 0..N-1 (checked first
    to last).
    """
    flipped = np.asarray(flipped, bool)
    hits = flipped[np.asarray(order)]
    return np.concatenate([[0.0], np.cumsum(hits)]) / max(int(flipped.sum()), 1)


def found_at(curve, fraction):
    """``curve[k]`` at ``k = round(fraction·N)`` checked images (``curve``: (N+1,) from :func:`fraction_found`)."""
    n = len(curve) - 1
    return float(curve[int(round(fraction * n))])


@dataclasses.dataclass
class MislabelResult:
    """Fraction of the flipped images found against the fraction checked, per ranking."""

    name: str
    settings: str
    curves: dict            # ranking name -> (N+1,) fraction found after checking k = 0..N images
    seconds: float
    n: int
    flipped: int
    memorised: float        # fraction of flipped images the model predicts as their (wrong) label

    def at(self, ranking, fraction):
        if ranking == "random (expected)":
            return float(fraction)
        return found_at(self.curves[ranking], fraction)

    @property
    def ok(self):
        si, loss = self.at("self-influence", 0.10), self.at("loss", 0.10)
        return bool(si >= loss and si >= 3 * 0.10)


def run_mislabel_panel(n_train=1500, epochs=30, fraction=0.10, damping=0.01, seed=0):
    """Koh & Liang Fig. 6 on the demo digits (module docstring). Returns a :class:`MislabelResult`."""
    from influence import demo
    from influence.curvature import make_solver
    from influence.model.hvp import Derivatives, TrainingObjective
    from influence.model.models import Classifier, make_preprocess, select_params
    from influence.scoring.self_influence import self_influence

    start = time.perf_counter()
    x, y, _, _ = digit_arrays(demo.SIZE, 3, n_train, seed, resample="bilinear")
    noisy, flipped = flip_labels(y, fraction, 10, seed)
    model, train_seconds = demo.train_model(x, noisy, epochs=epochs, seed=seed)
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"), description="demo CNN")
    archive = ArrayArchive(x, noisy)
    derivs = Derivatives(clf, (demo.SIZE, demo.SIZE, 3))
    solver = make_solver("ekfac", TrainingObjective(derivs, archive, chunk=512), damping, seed=seed, progress=False)
    t0 = time.perf_counter()
    solver.fit()
    res = self_influence(solver, derivs, archive, batch=512, progress=False)
    score_seconds = time.perf_counter() - t0
    memorised = float(np.mean(res.preds[flipped] == noisy[flipped]))
    log.info("mislabel: %d of %d training labels flipped (seed %d); demo CNN trained %d epochs in %.1f s; training "
             "accuracy on the given labels %.1f%% (clean %.1f%%, flipped %.1f%% = memorised); ekfac fit + self-influence "
             "%.1f s", int(flipped.sum()), len(y), seed, epochs, train_seconds, 100 * np.mean(res.preds == noisy),
             100 * np.mean(res.preds[~flipped] == noisy[~flipped]), 100 * memorised, score_seconds)
    rng = np.random.default_rng(seed)
    curves = {"self-influence": fraction_found(res.ranking(), flipped),
              "loss": fraction_found(np.lexsort((np.arange(len(y)), -res.losses)), flipped),
              "random (seeded)": fraction_found(rng.permutation(len(y)), flipped)}
    result = MislabelResult(name="mislabel", settings=f"ekfac λ={damping:g} (sampled Fisher), n={len(y)}, "
                            f"{int(flipped.sum())} flipped, {epochs} epochs", curves=curves,
                            seconds=time.perf_counter() - start, n=len(y), flipped=int(flipped.sum()),
                            memorised=memorised)
    for name in list(curves) + ["random (expected)"]:
        log.info("mislabel: %-17s finds %s", name, ", ".join(f"{100 * result.at(name, f):.1f}% at {100 * f:.0f}%"
                                                             for f in CHECKED))
    return result


def plot_mislabel(result, path):
    """Fraction of flipped labels found (y) against the fraction of the training set checked (x)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    checked = np.arange(result.n + 1) / result.n
    styles = {"self-influence": ("#c0392b", "-"), "loss": ("#1f4e79", "-"), "random (seeded)": ("0.5", "-")}
    for name, curve in result.curves.items():
        colour, ls = styles.get(name, ("k", "-"))
        at = ", ".join(f"{100 * result.at(name, f):.0f}%" for f in CHECKED)
        ax.plot(checked, curve, color=colour, ls=ls, lw=1.8, label=f"{name} ({at})")
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="random (expected)")
    for f in CHECKED:
        ax.axvline(f, color="0.8", lw=0.8, zorder=0)
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of the training set checked")
    ax.set_ylabel("fraction of the flipped labels found")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title="found at " + " / ".join(f"{100 * f:.0f}%" for f in CHECKED),
              title_fontsize=8)
    ax.set_title(f"mislabelled training images (Koh & Liang Fig. 6)\n{result.settings}", fontsize=9)
    fig.savefig(path, dpi=130)


# ----------------------------------------------------------------------------- command

def build_parser():
    from influence.cli import Parser

    p = Parser(prog="python -m influence.validate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--panels", default=DEFAULT_PANELS,
                   help=f"comma-separated: {', '.join(PANELS)} (default {DEFAULT_PANELS})")
    p.add_argument("--tests", type=int, default=None, help="test images per panel (default 3; quick 2)")
    p.add_argument("--top", type=int, default=None, help="most influential removals per test image (default 10)")
    p.add_argument("--random", type=int, default=None, help="random removals per test image (default 5)")
    p.add_argument("--out", default="validate.png", help="figure file (default validate.png)")
    p.add_argument("--quick", action="store_true", help="fewer images and steps (a fast look)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lissa-depth", type=int, default=None, help="LiSSA depth (default 3000; quick 1500)")
    p.add_argument("--lissa-batch", type=int, default=100, help="LiSSA minibatch (default 100)")
    p.add_argument("--cnn-train", type=int, default=None, help="CNN training images (default 500; quick 300)")
    p.add_argument("--cnn-steps", type=int, default=30, help="full-batch steps of the CNN retraining recipe")
    p.add_argument("--cnn-damping", default="auto", help="damping for the CNN: a number or auto (= λ_max/steps)")
    p.add_argument("--mislabel-damping", type=float, default=0.01,
                   help="damping of the mislabel panel's EK-FAC (default 0.01, as calculate.py)")
    p.add_argument("--mislabel-out", default=None,
                   help="figure of the mislabel panel (default: --out with _mislabel before the extension)")
    p.add_argument("--ekfac-fisher", default="sampled", choices=("sampled", "true", "empirical"),
                   help="Fisher of the ekfac panels (default sampled, as calculate.py)")
    p.add_argument("--lds-subsets", type=int, default=None, help="lds: random half-subsets (default 64; quick 6)")
    p.add_argument("--lds-seeds", type=int, default=2, help="lds: retraining seeds per subset (default 2)")
    p.add_argument("--lds-cache", default=None, help="lds: folder of the retraining cache (default lds_cache)")
    p.add_argument("--lds-folders", default="orig", help="lds: demo test folders scored (default orig)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def validate(args):
    """Run the chosen panels; returns the list of :class:`PanelResult`."""
    from influence.errors import UserError
    from influence.curvature import make_solver

    panels = [p.strip() for p in args.panels.split(",") if p.strip()]
    bad = [p for p in panels if p not in PANELS]
    if bad or not panels:
        raise UserError(f"--panels: unknown {', '.join(bad) or '(none)'}; choose from {', '.join(PANELS)}")
    quick = args.quick
    tests = args.tests if args.tests is not None else (2 if quick else 3)
    top = args.top if args.top is not None else (8 if quick else 10)
    rand = args.random if args.random is not None else (4 if quick else 5)
    if tests < 1 or top < 0 or rand < 0 or top + rand < 2:
        raise UserError("--tests must be >= 1 and --top + --random >= 2")
    results = []
    convex = None
    if "convex" in panels or "lissa" in panels or "ekfac" in panels:
        convex = ConvexProblem(tests=tests, seed=args.seed)
    if "convex" in panels:
        solver = make_solver("exact", convex.objective, 0.0, progress=False)
        res = run_panel("convex", convex, solver, top, rand, args.seed,
                        settings=f"exact, λ=0, n={convex.n}")
        log.info("convex: exact solver λ_min %.3g, λ_max %.3g", solver.info["lambda_min"], solver.info["lambda_max"])
        results.append(res)
    if "lissa" in panels:
        depth = args.lissa_depth or (1500 if quick else 3000)
        solver = make_solver("lissa", convex.objective, 0.0, iter=depth, bsize=args.lissa_batch, seed=args.seed,
                             progress=False)
        res = run_panel("lissa", convex, solver, top, rand, args.seed,
                        settings=f"lissa T={depth} b={args.lissa_batch} s={solver.scale:.3g}, λ=0")
        results.append(res)
    if "ekfac" in panels:
        results.append(_ekfac_panel("ekfac", convex, 0.0, top, rand, args.seed, args.ekfac_fisher,
                                    reference=("exact", make_solver("exact", convex.objective, 0.0, progress=False))))
    cg_scores = None
    if "cnn" in panels or "cnn-ekfac" in panels:
        n_train = args.cnn_train or (300 if quick else 500)
        steps = args.cnn_steps
        cnn = CNNProblem(n_train=n_train, epochs=15 if quick else 30, steps=steps, tests=tests, seed=args.seed)
        if str(args.cnn_damping).lower() == "auto":
            damping = cnn.lambda_max / steps
        else:
            try:
                damping = float(args.cnn_damping)
            except ValueError:
                raise UserError(f"--cnn-damping must be a number or auto, got {args.cnn_damping!r}") from None
    if "cnn" in panels:
        solver = make_solver("cg", cnn.objective, damping, cg_tol=1e-5, progress=False)
        start = time.perf_counter()
        cg_scores = cnn.scores(solver)     # kept for the cnn-ekfac panel's comparison
        scoring = time.perf_counter() - start
        res = run_panel("cnn", cnn, solver, top, rand, args.seed,
                        settings=f"cg λ={damping:.3g}, n={cnn.n}, {steps} GD steps", scored=cg_scores)
        res.seconds += scoring
        log.info("cnn: cg iterations %s; recipe noise %.2g vs median |actual| %.2g", solver.info["iterations"],
                 float(cnn.noise.max()), float(np.median(np.abs(res.actual))))
        results.append(res)
    if "cnn-ekfac" in panels:
        results.append(_ekfac_panel("cnn-ekfac", cnn, damping, top, rand, args.seed, args.ekfac_fisher,
                                    reference=("cg", cg_scores) if cg_scores is not None else None,
                                    settings=f", {steps} GD steps"))
    if "mislabel" in panels:
        if not args.mislabel_damping > 0:
            raise UserError(f"--mislabel-damping must be > 0, got {args.mislabel_damping}")
        n_train, epochs = (500, 8) if quick else (1500, 30)     # the demo's own (--quick) recipe
        results.append(run_mislabel_panel(n_train=n_train, epochs=epochs, damping=args.mislabel_damping,
                                          seed=args.seed))
    if "lds" in panels:     # influence/experiments/lds.py: LDS of every solver against retrained subsets
        from influence.experiments import lds

        results.append(lds.run_from_args(args))
    return results


def mislabel_path(args):
    """Where the mislabel figure goes: ``--mislabel-out``, else ``--out`` with ``_mislabel`` added."""
    if args.mislabel_out:
        return args.mislabel_out
    from pathlib import Path

    out = Path(args.out)
    return str(out.with_name(f"{out.stem}_mislabel{out.suffix or '.png'}"))


def _ekfac_panel(name, problem, damping, top, rand, seed, fisher, reference=None, settings=""):
    """An ``--solver ekfac`` panel; ``reference``: (name, solver or its ``scores()``) to compare all
    scores with (Pearson over every training image and test image)."""
    from influence.curvature import make_solver

    start = time.perf_counter()
    solver = make_solver("ekfac", problem.objective, damping, fisher=fisher, seed=seed, memory_budget=None,
                         progress=False)
    solver.fit()
    fit_seconds = time.perf_counter() - start
    scored = problem.scores(solver)
    res = run_panel(name, problem, solver, top, rand, seed, scored=scored,
                    settings=f"ekfac ({solver.fisher} Fisher) λ={damping:.3g}, n={problem.n}{settings}")
    res.seconds = time.perf_counter() - start
    if reference is not None:
        ref_name, ref = reference
        ref_scores = ref if isinstance(ref, tuple) else problem.scores(ref)
        res.reference = ref_name
        res.reference_pearson = pearson(scored[0].ravel(), ref_scores[0].ravel())
        per_test = [pearson(a, b) for a, b in zip(scored[0], ref_scores[0])]
        log.info("%s: Pearson of all scores against %s: %.4f (per test image %s)", name, ref_name,
                 res.reference_pearson, np.array2string(np.array(per_test), precision=3))
    log.info("%s: EK-FAC fit %.1f s (%s)", name, fit_seconds, solver.info["layers"])
    return res


def _job(args):
    start = time.perf_counter()
    results = validate(args)
    loo = [r for r in results if isinstance(r, PanelResult)]
    figures = []
    if loo:
        plot(loo, args.out)
        figures.append(args.out)
        print(f"{'panel':9} {'Pearson':>8} {'Spearman':>9} {'goal':>5} {'points':>6} {'seconds':>8}  settings")
    for r in loo:
        mark = "" if r.ok else "  MISSED"
        ref = ""
        if r.reference:
            ref = f"; Pearson vs {r.reference} scores {r.reference_pearson:.4f}"
            if not math.isnan(r.reference_goal):
                ref += f" (goal {r.reference_goal:.2f})"
        print(f"{r.name:9} {r.pearson:8.4f} {r.spearman:9.4f} {r.goal:5.2f} {len(r.actual):6d} "
              f"{r.seconds:8.1f}  {r.settings}{ref}{mark}")
    for r in results:
        if isinstance(r, MislabelResult):
            path = mislabel_path(args)
            plot_mislabel(r, path)
            figures.append(path)
            print(f"mislabel: flipped labels found when checking {' / '.join(f'{100 * f:.0f}%' for f in CHECKED)} "
                  f"of the training set ({r.seconds:.1f} s; {r.settings}; {100 * r.memorised:.0f}% of the flipped "
                  f"labels memorised)")
            for name in list(r.curves) + ["random (expected)"]:
                print(f"  {name:18} " + "  ".join(f"{100 * r.at(name, f):5.1f}%" for f in CHECKED))
            if not r.ok:
                print(f"  MISSED: goal at 10% checked: self-influence >= loss ({100 * r.at('loss', 0.1):.1f}%) and "
                      f">= 3x random (30%); got {100 * r.at('self-influence', 0.1):.1f}%")
    figures += [f for r in results for f in getattr(r, "figures", [])]
    print(f"figure: {', '.join(figures)}   total {time.perf_counter() - start:.0f} s")
    return 0 if all(r.ok for r in results) else 1


def main(argv=None):
    from influence import cli

    cli.quiet_tensorflow()
    return cli.main(build_parser, _job, argv)


if __name__ == "__main__":
    sys.exit(main())
