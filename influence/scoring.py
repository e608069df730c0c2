"""Batched influence scores with a per-layer split.

For training images ``z_i`` (a batch of N) and T inverse-HVPs ``s_t``, the score is
``∇L(z_i)·s_t`` (DESIGN.md). Layer ``l`` with input ``x_l`` and output ``h_l`` takes the share::

    share_l(i, t) = ⟨∂L_i/∂h_l , J_{θ_l} h_l [s_{t,l}]⟩

the backward signal at the layer's output (one backward pass for the batch, shared by every test
image) against the layer's own weight-direction tangent with its input held fixed. The shares add
up to the full directional derivative. Layers whose output is linear in their weights before the
activation (Dense, Conv*) are handled in one call for all T test images: the T tangent kernels are
stacked along the output channels, so the cost per extra test image is about one layer forward.
Other layers (BatchNorm, ...) fall back to a forward-mode JVP of the layer per test image.
"""
import keras
import numpy as np
import tensorflow as tf

from influence.hvp import vec_stack


def _linear_kind(layer):
    """'dense', 'conv' or None: whether ``layer`` computes act(linear(x; W) + b) we can redo by hand."""
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return None
    names = {id(v) for v in layer.trainable_weights}
    kernel = getattr(layer, "kernel", None)
    bias = getattr(layer, "bias", None)
    if kernel is None or id(kernel) not in names:
        return None
    if bias is not None and id(bias) not in names:
        return None
    if len(layer.trainable_weights) != (1 if bias is None else 2):
        return None
    if type(layer) is keras.layers.Dense:
        return "dense"
    from keras.src.layers.convolutional.base_conv import BaseConv

    if isinstance(layer, BaseConv) and getattr(layer, "groups", 1) == 1 \
            and getattr(layer, "data_format", "channels_last") == "channels_last" \
            and type(layer).__name__ in ("Conv1D", "Conv2D", "Conv3D"):
        return "conv"
    return None


class _Tap:
    """Takes over the call of each selected layer during the forward pass and records what the
    per-layer split needs: the layer input (held fixed) and the watched output tensor."""

    def __init__(self, tape, kinds):
        self.tape = tape
        self.kinds = kinds
        self.records = []  # (layer, kind, x, out)

    def __call__(self, layer, args, kwargs):
        kind = self.kinds[id(layer)]
        if kind is not None:
            z = self._linear(layer, kind, args[0], layer.kernel, layer.bias)
            self.tape.watch(z)
            self.records.append((layer, kind, tf.stop_gradient(args[0]), z))
            act = layer.activation
            return z if act is None else act(z)
        out = layer(*args, **kwargs)
        self.tape.watch(out)
        fixed = tuple(tf.stop_gradient(a) if tf.is_tensor(a) else a for a in args)
        self.records.append((layer, None, (fixed, kwargs), out))
        return out

    @staticmethod
    def _linear(layer, kind, x, kernel, bias):
        if kind == "dense":
            z = tf.tensordot(x, kernel, axes=[[x.shape.rank - 1], [0]])
        else:
            z = layer.convolution_op(x, kernel)
        if bias is not None:
            z = z + bias
        return z


class Scorer:
    """``shares(x, y, stacked) -> (T, N, L)`` per-layer scores of a batch of training images.

    ``stacked``: a Vec whose parts have a leading axis T (see :func:`influence.hvp.vec_stack`).
    Layer order is ``classifier.groups``; ``layer_names`` names the L columns.
    """

    def __init__(self, derivs):
        self.d = derivs
        clf = derivs.clf
        self.clf = clf
        self.layer_names = [g.name for g in clf.groups]
        self.split = clf.supports_tap
        self._kinds = {id(g.layer): _linear_kind(g.layer) for g in clf.groups}
        self._group_of = {id(g.layer): i for i, g in enumerate(clf.groups)}
        # the position of each group's variables inside the flat variable list
        self._slices, at = [], 0
        for g in clf.groups:
            self._slices.append(slice(at, at + len(g.variables)))
            at += len(g.variables)
        stacked_spec = tuple(tf.TensorSpec((None,) + tuple(s.shape), s.dtype) for s in derivs.vec_spec)
        fn = self._shares_fn if self.split else self._totals_fn
        self._compiled = tf.function(fn, input_signature=[derivs.x_spec, derivs.y_spec, stacked_spec])

    def shares(self, x, y, stacked):
        """(T, N, L) float array; with a non-functional model L = 1 (the total only)."""
        return self._compiled(x, y, tuple(stacked)).numpy()

    def shares_for(self, x, y, vecs):
        return self.shares(x, y, vec_stack(vecs))

    # --- graph functions ------------------------------------------------------------------------
    def _totals_fn(self, x, y, stacked):
        t = tf.shape(stacked[0])[0]
        out = tf.map_fn(lambda v: self.d._jvp_losses(x, y, v), stacked,
                        fn_output_signature=tf.TensorSpec((None,), self.d.dtype))
        return tf.reshape(out, [t, -1, 1])

    def _shares_fn(self, x, y, stacked):
        with tf.GradientTape(persistent=False) as tape:
            tap = _Tap(tape, self._kinds)
            logits = self.clf.image_logits(x, tap=tap)
            loss = tf.reduce_sum(self.d.per_example_loss(logits, y))
        outs = [r[3] for r in tap.records]
        deltas = tape.gradient(loss, outs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        per_layer = {}
        for (layer, kind, x_l, _), delta in zip(tap.records, deltas):
            g_index = self._group_of[id(layer)]
            tangents = stacked[self._slices[g_index]]
            if kind is not None:
                share = self._linear_share(layer, kind, x_l, delta, tangents)
            else:
                share = self._generic_share(layer, x_l, delta, tangents)
            per_layer[g_index] = share if g_index not in per_layer else per_layer[g_index] + share
        t = tf.shape(stacked[0])[0]
        n = tf.shape(y)[0]
        cols = [per_layer.get(i, tf.zeros([t, n], self.d.dtype)) for i in range(len(self.clf.groups))]
        return tf.stack(cols, axis=-1)

    @staticmethod
    def _linear_share(layer, kind, x, delta, tangents):
        """(T, N): ⟨δ, linear(x; ΔW_t) + Δb_t⟩ for all t in one call.

        x: layer input (N, ..., C_in); delta: ∂L/∂z at the pre-activation (N, ..., C_out);
        tangents: (ΔW (T, ..., C_in, C_out), [Δb (T, C_out)]).
        """
        dw = tangents[0]
        rank = dw.shape.rank
        t = tf.shape(dw)[0]
        c_out = tf.shape(dw)[-1]
        # (T, ..., C_in, C_out) -> (..., C_in, T, C_out) -> (..., C_in, T*C_out)
        perm = list(range(1, rank - 1)) + [0, rank - 1]
        k = tf.transpose(dw, perm)
        k = tf.reshape(k, tf.concat([tf.shape(k)[:-2], [t * c_out]], axis=0))
        z = _Tap._linear(layer, kind, x, k, None)                       # (N, ..., T*C_out)
        z = tf.reshape(z, tf.concat([tf.shape(z)[:-1], [t, c_out]], axis=0))  # (N, ..., T, C_out)
        prod = z * tf.expand_dims(delta, -2)
        axes = list(range(1, prod.shape.rank - 2)) + [prod.shape.rank - 1]
        share = tf.transpose(tf.reduce_sum(prod, axis=axes))            # (T, N)
        if len(tangents) > 1:
            d_sum = tf.reduce_sum(delta, axis=list(range(1, delta.shape.rank - 1)))  # (N, C_out)
            share = share + tf.matmul(tangents[1], d_sum, transpose_b=True)       # (T, N)
        return share

    @staticmethod
    def _generic_share(layer, call, delta, tangents):
        """(T, N) by a forward-mode JVP of the layer (input fixed) per test image."""
        args, kwargs = call
        primals = [v.value for v in layer.trainable_weights]

        def one(tangent):
            with tf.autodiff.ForwardAccumulator(primals, list(tangent)) as acc:
                out = layer(*args, **kwargs)
            jv = acc.jvp(out, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.reduce_sum(tf.reshape(jv * delta, [tf.shape(delta)[0], -1]), axis=1)

        return tf.map_fn(one, tuple(tangents), fn_output_signature=tf.TensorSpec((None,), delta.dtype))
