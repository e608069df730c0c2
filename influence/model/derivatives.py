"""Losses, gradients and Hessian-vector products of a :class:`~influence.model.models.Classifier`.

Notation (see docs/DESIGN.md): ``L(z; θ)`` is the per-image cross-entropy from logits, ``Ω(θ)`` the
model's weight regularisation, ``R(θ) = mean_i L(z_i) + Ω``. A *vector* over the selected
parameters is a tuple of tensors shaped like ``classifier.variables`` ("a Vec").

All heavy functions are ``tf.function``s with fixed input signatures, so they trace once.
"""
import numpy as np
import tensorflow as tf


# ----------------------------------------------------------------------------- the loss

@tf.custom_gradient
def _cross_entropy(logits, onehot):
    # loss = log Σ_c exp(z_c − z_y), as (m − z_y) + log1p(Σ_{c≠argmax} exp(z_c − m)) with m = max z:
    # exact for a confident image, where log(1 + ε) would round to 0
    m = tf.reduce_max(logits, axis=-1, keepdims=True)
    shifted = tf.exp(logits - m)
    top = tf.one_hot(tf.argmax(logits, axis=-1), tf.shape(logits)[-1], dtype=logits.dtype)
    rest = tf.reduce_sum(shifted * (1.0 - top), axis=-1)
    z_y = tf.reduce_sum(logits * onehot, axis=-1)
    loss = (m[:, 0] - z_y) + tf.math.log1p(rest)

    def grad(upstream):
        # ∂L/∂z = p − e_y, with the true-class entry −Σ_{c≠y} p_c instead of p_y − 1 (which is 0 in
        # float32 once p_y rounds to 1: the gradient would lose its true-class term). The ops are
        # differentiable, so HVPs (reverse over reverse) and forward mode see the same Jacobian.
        p = tf.nn.softmax(logits)
        others = tf.reduce_sum(p * (1.0 - onehot), axis=-1, keepdims=True)      # Σ_{c≠y} p_c = 1 − p_y
        g = p * (1.0 - onehot) - onehot * others
        return upstream[:, None] * g, tf.zeros_like(onehot)

    return loss, grad


def cross_entropy(logits, y):
    """Per-image cross-entropy ``−log softmax(z)_y`` from logits (N, K) and int labels (N,) -> (N,).

    Numerically: the loss is ``log1p`` of the other classes' mass and the gradient's true-class
    entry is ``−Σ_{c≠y} p_c`` (docs/DESIGN.md, "What is computed"): a float32 model gets the
    gradient of a confident image as float64 does, where ``p_y − 1`` would cancel to 0.
    """
    onehot = tf.one_hot(y, tf.shape(logits)[-1], dtype=logits.dtype)
    return _cross_entropy(logits, onehot)


# ----------------------------------------------------------------------------- derivatives

class Derivatives:
    """Compiled derivative routines of one classifier, over its selected variables.

    Images enter as uint8 (N, H, W, C) pixels -- the archives' compact form -- or, with ``float_input``,
    as floats in the model's dtype that are the model's input as they are (preprocess ``none``: any values,
    normalised or augmented); labels as int64 (N,); preprocessing happens inside. :attr:`x_spec` is the
    images' signature, which every compiled function of the solvers and the scorer takes.
    """

    def __init__(self, classifier, image_shape, float_input=False):
        self.clf = classifier
        self.image_shape = tuple(image_shape)
        self.variables = classifier.variables
        dtype = classifier.dtype
        if float_input and not classifier.takes_float_input:
            raise ValueError(f"float input needs preprocess 'none', not {classifier.preprocess_mode!r}")
        #: the images' dtype: uint8 pixels, or the model's float dtype
        self.input_dtype = dtype if float_input else tf.uint8
        # input signatures, shared with the solvers and the scorer so every function traces once
        self.x_spec = x_spec = tf.TensorSpec((None,) + self.image_shape, self.input_dtype)
        self.y_spec = y_spec = tf.TensorSpec((None,), tf.int64)
        self.vec_spec = vec_spec = tuple(tf.TensorSpec(v.shape, dtype) for v in self.variables)
        scalar = tf.TensorSpec((), dtype)
        self.predict = tf.function(self._predict, input_signature=[x_spec])
        self.losses = tf.function(self._losses, input_signature=[x_spec, y_spec])
        self.gradient = tf.function(self._gradient, input_signature=[x_spec, y_spec])
        self.hvp = tf.function(self._hvp, input_signature=[x_spec, y_spec, vec_spec, scalar, scalar])
        self.ggn_vp = tf.function(self._ggn_vp, input_signature=[x_spec, y_spec, vec_spec, scalar, scalar])
        self.jvp_losses = tf.function(self._jvp_losses, input_signature=[x_spec, y_spec, vec_spec])
        #: the products as graph functions, to call inside another tf.function (the scorer's, the objective's)
        self.jvp_losses_graph, self.hvp_graph, self.ggn_vp_graph = self._jvp_losses, self._hvp, self._ggn_vp
        self.dtype = dtype

    def _primals(self):
        return [v.value for v in self.variables]

    def _logits(self, x):
        return self.clf.image_logits(x)

    def per_example_loss(self, logits, y):
        """Cross-entropy from logits, (N, K), (N,) -> (N,), without cancellation (:func:`cross_entropy`)."""
        return cross_entropy(logits, y)

    def regularization(self):
        """Ω over the selected variables (Keras weight regularisers), a scalar."""
        terms = [v.regularizer(v.value) for v in self.variables if getattr(v, "regularizer", None) is not None]
        if not terms:
            return tf.constant(0.0, self.clf.dtype)
        return tf.cast(tf.add_n(terms), self.clf.dtype)

    def _predict(self, x):
        """(N,H,W,C) images (:attr:`x_spec`) -> softmax probabilities (N, K)."""
        return tf.nn.softmax(self._logits(x))

    def _losses(self, x, y):
        """(N,) per-image losses."""
        return self.per_example_loss(self._logits(x), y)

    def _gradient(self, x, y):
        """∇ Σ_i L(z_i) over the batch (no Ω) -> Vec. For one test image pass N = 1.

        A variable the loss does not reach gets zeros (as in the HVP), never None;
        ``models.check_classifier`` refuses such layers up front.
        """
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(self._losses(x, y))
        return tuple(tape.gradient(loss, self._primals(), unconnected_gradients=tf.UnconnectedGradients.ZERO))

    def _hvp(self, x, y, v, data_weight, reg_weight):
        """∇²(data_weight·Σ_i L(z_i) + reg_weight·Ω) v -> Vec, as ∇(∇obj · v) (reverse over reverse).

        Never slower than forward-over-reverse here (BENCHMARKS.md): on a loaded machine it won
        (demo CNN 45 -> 33 ms: forward mode carries a zero tangent for the input images through
        every conv, and MaxPoolGradGrad has no fast CPU kernel); on a quiet one the two tie
        (24-25 ms at batch 256). XLA doubled it (48 ms).
        """
        primals = self._primals()
        zero = tf.UnconnectedGradients.ZERO
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                obj = data_weight * tf.reduce_sum(self._losses(x, y)) + reg_weight * self.regularization()
            grads = inner.gradient(obj, primals, unconnected_gradients=zero)
            gv = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, v)])
        return tuple(outer.gradient(gv, primals, unconnected_gradients=zero))

    def _ggn_vp(self, x, y, v, data_weight, reg_weight):
        """Gauss–Newton product ``(data_weight·Σ_i J_iᵀ H_i J_i + reg_weight·∇²Ω) v`` -> Vec.

        ``J_i = ∂z_i/∂θ`` (the logits' Jacobian), ``H_i = diag(p_i) − p_i p_iᵀ`` the cross-entropy's
        Hessian in the logits (positive semi-definite, whatever the label). ``J v`` in forward mode,
        ``H_i`` in closed form, ``Jᵀ(·)`` in reverse mode: positive semi-definite, so CG and LiSSA
        apply away from a minimum without a large damping. The regulariser's Hessian is exact.
        """
        primals = self._primals()
        zero = tf.UnconnectedGradients.ZERO
        with tf.GradientTape() as tape:                       # one forward pass for both modes
            with tf.autodiff.ForwardAccumulator(primals, list(v)) as acc:
                logits = self._logits(x)
            jv = tf.stop_gradient(acc.jvp(logits, unconnected_gradients=zero))          # (N, K)
            p = tf.stop_gradient(tf.nn.softmax(logits))
            hjv = p * jv - p * tf.reduce_sum(p * jv, axis=-1, keepdims=True)           # H_i J_i v
            obj = data_weight * tf.reduce_sum(logits * hjv)
        data = tape.gradient(obj, primals, unconnected_gradients=zero)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                reg = reg_weight * self.regularization()
            grads = inner.gradient(reg, primals, unconnected_gradients=zero)
            gv = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, v)])
        return tuple(a + b for a, b in zip(data, outer.gradient(gv, primals, unconnected_gradients=zero)))

    def _jvp_losses(self, x, y, v):
        """[∇L(z_i)·v]_i, the directional derivative of the per-image losses -> (N,)."""
        with tf.autodiff.ForwardAccumulator(self._primals(), list(v)) as acc:
            losses = self._losses(x, y)
        return acc.jvp(losses, unconnected_gradients=tf.UnconnectedGradients.ZERO)
