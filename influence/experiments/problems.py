"""Problems of the leave-one-out check: a trained model, its data, the engine around it, retraining.

* :class:`ConvexProblem` -- softmax regression with L2 (float64) on the 8x8 digits, fitted to its
  optimum by Newton's method; retrained without an image to the optimum (dense Hessian by hand);
* :class:`CNNProblem` -- the demo CNN (:mod:`influence.experiments.demo`, float32); "retraining" is
  a fixed recipe of full-batch gradient steps from the trained weights (why: the docstring of
  :mod:`influence.experiments.validate_cli`).

Each problem answers :meth:`Problem.scores` (the engine's scores, (T, n)) and
:meth:`Problem.actual_change` (the retrained test losses minus the base ones, (T,)).
"""
import logging
import time

import numpy as np

from influence.experiments.arrays import ArrayArchive, digit_arrays

log = logging.getLogger(__name__)


class Problem:
    """A trained model with its data, the engine around it, and leave-one-out retraining.

    Subclasses set ``self.model`` (Keras, logits out), ``self.clf``, the arrays, and implement
    :meth:`_retrain` (-> test losses after retraining without image ``i``).
    ``self.base_losses`` are the test losses the actual changes are measured from.
    """

    name = "problem"

    def _setup_engine(self, image_shape, chunk):
        import tensorflow as tf

        from influence.model.derivatives import Derivatives

        from influence.model.objective import TrainingObjective
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
        """Per-image weights (n,) of the training objective: 1/n each, 0 for the dropped image."""
        w = np.full(self.n, 1.0 / self.n, dtype=self.clf.dtype.as_numpy_dtype)
        if drop is not None:
            w[drop] = 0.0
        return w

    def get_theta(self):
        """The trainable variables' values: a list of numpy arrays, one per variable."""
        return [np.array(v.numpy()) for v in self.variables]

    def set_theta(self, theta):
        for v, t in zip(self.variables, theta):
            v.assign(t)

    def test_losses(self):
        """Losses float64 (T,) of the chosen test images under the current weights."""
        return self._loss_fn(self.x_test, self.y_test).numpy().astype(np.float64)

    def pick_tests(self, count):
        """Choose the ``count`` held-out images with the largest loss under the trained model as the
        test images: sets ``test_ids`` (count,), ``x_test`` (count, H, W, C) and ``y_test`` (count,)."""
        losses = self._loss_fn(self.x_held, self.y_held).numpy()
        order = np.argsort(-losses, kind="mergesort")[:count]
        self.test_ids = order
        self.x_test, self.y_test = self.x_held[order], self.y_held[order]
        log.info("%s: test images = held-out #%s, losses %s", self.name, order.tolist(),
                 np.array2string(losses[order], precision=3))

    def actual_change(self, i):
        """Change (T,) of every test image's loss when training image ``i`` is left out (cached)."""
        if i not in self._retrained:
            theta = self.get_theta()
            try:
                self._retrained[i] = self._retrain(i) - self.base_losses
            finally:
                self.set_theta(theta)
        return self._retrained[i]

    def scores(self, solver):
        """``(scores, s)``: (T, n) scores of every training image for every test image, and the T s_t vectors."""
        x_t, y_t = self.x_test, self.y_test
        grads = [self.derivs.gradient(x_t[k:k + 1], y_t[k:k + 1]) for k in range(len(y_t))]
        s = solver.solve(grads)
        parts = []
        for start in range(0, self.n, self.chunk):
            x, y = self.archive.take(np.arange(start, min(start + self.chunk, self.n)))
            parts.append(self.scorer.shares_for(x, y, s).sum(axis=-1))
        return np.concatenate(parts, axis=1), s

    def regulariser_offset(self, s):
        """s_tᵀ∇Ω(θ̂)/(n−1) per test image (T,): what a mean over n−1 images would add
        (:mod:`influence.experiments.validate_cli`)."""
        from influence.model.vectors import vec_to_numpy

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
    """The demo CNN (float32), trained by :func:`influence.experiments.demo.train_model`; the retraining
    recipe is ``steps`` full-batch gradient steps of size ``1/λ_max`` from the trained weights."""

    name = "cnn"

    def __init__(self, n_train=500, epochs=30, steps=30, tests=3, seed=0):
        from influence.experiments import demo
        from influence.model.models import Classifier, make_preprocess, select_params
        from influence.curvature.iterative.lissa import estimate_lambda_max

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
