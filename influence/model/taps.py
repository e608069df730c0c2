"""Capturing what selected layers see during a forward pass: their input and pre-activation output.

The scorer (per-layer score split) and K-FAC/EK-FAC (Kronecker factors) both need, for every
selected layer ``l`` of a batch, the layer input ``x_l`` and the backward signal ``δ_l = ∂L/∂z_l``
at its pre-activation output ``z_l``. :class:`Tap` takes over each selected layer's call in
:meth:`influence.model.models.Classifier.logits` and records both; one ``tape.gradient`` over the
recorded outputs then gives every ``δ_l`` in a single backward pass.

Layers computing ``act(linear(x; W) + b)`` (Dense, Conv1D/2D/3D channels_last, no groups) are redone
by hand so ``z_l`` is the pre-activation; any other layer with weights is called as it is and its
output is watched. For conv layers :func:`patches` gives the input patch at every output position,
so the per-image weight gradient is ``G_n = Σ_p a_{n,p} δ_{n,p}ᵀ`` (docs/DESIGN.md).
"""
import keras
import tensorflow as tf

from influence.model import keras_private


def linear_kind(layer):
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
    if isinstance(layer, keras_private.base_conv_class()) and getattr(layer, "groups", 1) == 1 \
            and getattr(layer, "data_format", "channels_last") == "channels_last" \
            and type(layer).__name__ in ("Conv1D", "Conv2D", "Conv3D"):
        return "conv"
    return None


def linear(layer, kind, x, kernel, bias):
    """``linear(x; kernel) + bias`` of a Dense/Conv layer, without its activation."""
    if kind == "dense":
        z = tf.tensordot(x, kernel, axes=[[x.shape.rank - 1], [0]])
    else:
        z = layer.convolution_op(x, kernel)
    if bias is not None:
        z = z + bias
    return z


class Tap:
    """Takes over the call of each selected layer and records ``(layer, kind, x, z)``.

    ``kind`` is :func:`linear_kind`'s answer. For linear layers ``x`` is the layer input (held
    fixed: ``stop_gradient``) and ``z`` the watched pre-activation; for other layers ``x`` is
    ``(args, kwargs)`` with tensors held fixed and ``z`` the watched output.
    """

    def __init__(self, tape, kinds):
        self.tape = tape
        self.kinds = kinds
        self.records = []

    def __call__(self, layer, args, kwargs):
        kind = self.kinds[id(layer)]
        if kind is not None:
            z = linear(layer, kind, args[0], layer.kernel, layer.bias)
            self.tape.watch(z)
            self.records.append((layer, kind, tf.stop_gradient(args[0]), z))
            act = layer.activation
            return z if act is None else act(z)
        out = layer(*args, **kwargs)
        self.tape.watch(out)
        fixed = tuple(tf.stop_gradient(a) if tf.is_tensor(a) else a for a in args)
        self.records.append((layer, None, (fixed, kwargs), out))
        return out


# ----------------------------------------------------------------------------- conv patches

def patch_support(layer, kind):
    """True when :func:`patches` can unfold this layer's input (else callers use another route)."""
    if kind == "dense":
        return True
    if kind != "conv":
        return False
    name = type(layer).__name__
    padding = str(getattr(layer, "padding", "valid")).lower()
    if padding not in ("valid", "same"):
        return False
    if name == "Conv3D":
        return all(int(r) == 1 for r in layer.dilation_rate)
    return name in ("Conv1D", "Conv2D")


def patches(layer, kind, x):
    """The layer's input at every output position, flattened like its kernel.

    Args:
      layer: a Dense or Conv1D/2D/3D layer (see :func:`patch_support`).
      x: its input, (N, ..., C_in).

    Returns:
      (N, P, K): P output positions (1 for a Dense layer on (N, C_in) input; the product of the
      leading axes for Dense on higher-rank input), K = prod(kernel.shape[:-1]) -- the order matches
      ``kernel.reshape(K, C_out)``.
    """
    if kind == "dense":
        k = tf.shape(x)[-1]
        return tf.reshape(x, [tf.shape(x)[0], -1, k])
    name = type(layer).__name__
    padding = str(layer.padding).upper()
    if name == "Conv1D":
        k = int(layer.kernel_size[0])
        p = tf.image.extract_patches(x[:, :, None, :], sizes=[1, k, 1, 1],
                                     strides=[1, int(layer.strides[0]), 1, 1],
                                     rates=[1, int(layer.dilation_rate[0]), 1, 1], padding=padding)
    elif name == "Conv2D":
        kh, kw = (int(s) for s in layer.kernel_size)
        sh, sw = (int(s) for s in layer.strides)
        rh, rw = (int(s) for s in layer.dilation_rate)
        p = tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1], rates=[1, rh, rw, 1],
                                     padding=padding)
    else:
        ks = [1] + [int(s) for s in layer.kernel_size] + [1]
        st = [1] + [int(s) for s in layer.strides] + [1]
        p = tf.extract_volume_patches(x, ksizes=ks, strides=st, padding=padding)
    return tf.reshape(p, [tf.shape(p)[0], -1, tf.shape(p)[-1]])


def flat_signal(delta):
    """Backward signal (N, ..., C_out) -> (N, P, C_out), positions in the order of :func:`patches`."""
    return tf.reshape(delta, [tf.shape(delta)[0], -1, tf.shape(delta)[-1]])


def per_image_weight_grads(layer, kind, x, delta):
    """Per-image kernel gradients ``G_n = Σ_p a_{n,p} δ_{n,p}ᵀ`` -> (N, K, C_out).

    (The bias gradient is ``Σ_p δ_{n,p}``, (N, C_out).)
    """
    a = patches(layer, kind, x)
    return tf.einsum("npk,npo->nko", a, flat_signal(delta))
