"""Loading a Keras classifier and seeing it as ``logits(x)`` over a chosen set of parameters.

A :class:`Classifier` wraps a Keras 3 model with three things the influence math needs:

* ``preprocess(x)`` -- the model's own input transform of uint8 pixels (or, with ``none``, of float arrays
  that are already the model's input), run inside TensorFlow graphs;
* ``logits(x, tap)`` -- the forward pass with a final softmax stripped, optionally letting a *tap*
  take over the call of each selected layer (the per-layer score split uses this);
* ``groups`` -- the selected parameters, grouped by the layer that owns them (``--params``).
"""
import logging
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from influence.errors import SettingError, UserError
from influence.model import keras_private
from influence.model.keras_models import load_keras_model
from influence.model.vectors import vec_size

log = logging.getLogger(__name__)

PREPROCESS_MODES = ("auto", "none", "caffe", "tf", "torch", "unit")


@dataclass
class ParamGroup:
    """The selected variables of one layer. ``variables`` are Keras variables."""

    name: str
    layer: object
    variables: list = field(default_factory=list)


# ----------------------------------------------------------------------------- preprocessing

def make_preprocess(mode, application_fn=None):
    """Return ``f(x) -> float tensor`` for uint8/float images (N, H, W, 3) in RGB order.

    ``mode``: ``none`` (integer pixels cast to float32; float input passed through as it is, in its own
    dtype: the arrays are what the model eats), ``unit`` (x / 255), ``caffe`` (BGR, minus ImageNet mean),
    ``tf`` (x / 127.5 - 1), ``torch`` (x / 255, ImageNet mean/std), or ``auto`` (the
    ``keras.applications`` model's own ``preprocess_input``; ``none`` for a model file).
    """
    if mode not in PREPROCESS_MODES:
        raise SettingError("preprocess", f"unknown {mode!r}; choose one of {', '.join(PREPROCESS_MODES)}")
    if mode == "auto":
        if application_fn is None:
            mode = "none"
        else:
            module = __import__(application_fn.__module__, fromlist=["preprocess_input"])
            own = getattr(module, "preprocess_input", None)
            if own is None:
                mode = "none"
            else:
                return lambda x: own(tf.cast(x, tf.float32))
    if mode == "none":
        return _cast_pixels
    if mode == "unit":
        return lambda x: tf.cast(x, tf.float32) / 255.0
    from keras.applications import imagenet_utils

    return lambda x: imagenet_utils.preprocess_input(tf.cast(x, tf.float32), mode=mode)


def _cast_pixels(x):
    """``none``: integer pixels -> float32 (the uint8 path, as ever); float input as it is (no rounding
    through float32 on the way to a float64 model)."""
    x = tf.convert_to_tensor(x)
    return x if x.dtype.is_floating else tf.cast(x, tf.float32)


def resolved_mode(mode, application_fn=None):
    """The preprocess ``mode`` as :func:`make_preprocess` applies it: ``auto`` is ``none`` for a model file or
    object (no ``keras.applications`` constructor, or one without ``preprocess_input``)."""
    if mode != "auto":
        return mode
    if application_fn is None:
        return "none"
    module = __import__(application_fn.__module__, fromlist=["preprocess_input"])
    return "auto" if getattr(module, "preprocess_input", None) is not None else "none"


# ----------------------------------------------------------------------------- the graph

_BINARY_HINT = ("binary models with one output unit (or sigmoid outputs) are not supported: give the model two "
                "outputs with softmax (or linear logits), one per class, trained with sparse categorical cross-entropy")


def _activation_name(activation):
    if activation is None:
        return ""
    return (getattr(activation, "__name__", "") or type(activation).__name__).lower()


def _is_softmax(activation):
    """keras.activations.softmax / keras.ops.softmax ("softmax") or tf.nn.softmax ("softmax_v2")."""
    return _activation_name(activation) in ("softmax", "softmax_v2")


def _is_sigmoid(activation):
    return _activation_name(activation) in ("sigmoid", "hard_sigmoid")


def _graph_of(model):
    """The Functional graph behind ``model`` (Sequential keeps one), or None for subclassed models."""
    Functional = keras_private.functional_class()
    if isinstance(model, Functional):
        return model
    inner = keras_private.sequential_graph(model)
    if isinstance(inner, Functional):
        return inner
    return None


def _one(tensors):
    """A single input stays a single tensor (a list of one makes Keras warn on every call)."""
    return tensors[0] if len(tensors) == 1 else list(tensors)


def _linear_twin(layer, args, kwargs):
    """Call a copy of ``layer`` with a linear activation on ``layer``'s own inputs; its weights are copied."""
    config = layer.get_config()
    config["activation"] = "linear"
    try:
        twin = type(layer).from_config(config)
        out = twin(*args, **kwargs)
        for mine, theirs in zip(twin.weights, layer.weights, strict=True):
            mine.assign(theirs.value)
    except Exception as exc:  # a layer whose config does not round-trip
        raise UserError(f"could not strip the softmax of layer {layer.name!r} ({type(layer).__name__}): "
                        f"{str(exc).splitlines()[0]}; save the model with a linear final layer") from None
    return out


def _logits_of(graph, path):
    """``(logits tensor, note)`` for the output of a functional graph, or ``(None, note)`` when nothing ends it
    that can be stripped. Symbolic: builds on the graph's own tensors, never changes a layer."""
    op, args, kwargs = keras_private.producing_call(graph.outputs[0])  # the call computing the only output
    where = "/".join(path + [op.name])
    if isinstance(op, keras.layers.Softmax) or (
            isinstance(op, keras.layers.Activation) and _is_softmax(op.activation)):
        return args[0], f"cut the final softmax layer {where!r}"
    if _is_sigmoid(getattr(op, "activation", None)):
        raise UserError(f"the model ends in a sigmoid (layer {where!r}): {_BINARY_HINT}")
    inner = _graph_of(op) if isinstance(op, keras.Model) else None
    if inner is not None:
        out, note = _logits_of(inner, path + [op.name])
        if out is None:
            return None, note
        return keras.Model(_one(inner.inputs), out, name=op.name)(*args, **kwargs), note
    if _is_softmax(getattr(op, "activation", None)):
        return _linear_twin(op, args, kwargs), f"stripped the softmax of layer {where!r}"
    return None, "no final softmax found: the outputs are taken as logits"


def strip_softmax(model):
    """Make ``model`` output logits. Returns ``(logits_model, what_was_done)``; ``model`` is not changed.

    A softmax that ends the model is found at any depth of nested Sequential/Functional models:
    a final ``Softmax`` or ``Activation('softmax')`` layer (also ``Activation(keras.activations.softmax)``
    or ``tf.nn.softmax``) is cut off; a final layer with a softmax activation (``Dense(K,
    activation='softmax')``) is replaced by a copy with a linear activation (its weights copied,
    so nothing is shared with -- or written back to -- the loaded model or its file). The result is
    a new functional model over the same layers (shared weights) otherwise.

    Raises UserError for a model with several outputs, one output unit, or a sigmoid at the end
    (binary models). A subclassed model cannot be rewired: it is returned as it is, and
    :func:`check_classifier` refuses it if its outputs are probabilities.
    """
    graph = _graph_of(model)
    if graph is None:
        return model, "subclassed model, not inspected for a final softmax: the outputs are taken as logits"
    if len(graph.outputs) != 1:
        raise UserError(f"the model has {len(graph.outputs)} outputs: a classifier with one output "
                        f"(batch, classes) is needed")
    if graph.outputs[0].shape[-1] == 1:
        raise UserError(f"the model has one output unit: {_BINARY_HINT}")
    out, note = _logits_of(graph, [])
    if out is None:
        return model, note
    return keras.Model(_one(graph.inputs), out, name=model.name), note


def leaf_layers(model):
    """Layers in call order, nested models expanded."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers and _graph_of(layer) is not None:
            out.extend(leaf_layers(layer))
        else:
            out.append(layer)
    return out


def select_params(model, spec):
    """Parse ``--params`` (``all``, ``last:N`` or comma-separated layer names) into ParamGroups."""
    layers = [l for l in leaf_layers(model) if l.trainable_weights]
    if not layers:
        raise UserError("the model has no trainable weights")
    spec = (spec or "all").strip()
    if spec == "all":
        chosen = layers
    elif spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = 0
        if n < 1:
            raise SettingError("params", f"{spec!r}: N in last:N must be a positive integer")
        chosen = layers[-n:]
    else:
        by_name = {l.name: l for l in layers}
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SettingError(
                "params",
                f"no layer with weights named {', '.join(unknown)}; "
                f"layers with weights: {', '.join(by_name)}"
            )
        chosen = [by_name[n] for n in names]
        chosen.sort(key=layers.index)
    return [ParamGroup(l.name, l, list(l.trainable_weights)) for l in chosen]


class Classifier:
    """A Keras model as ``logits(preprocess(x))`` with selected parameter groups.

    ``logits(x, tap=None)``: ``x`` float (N, H, W, C) already preprocessed; returns (N, K) logits.
    When ``tap`` is given, each selected layer's call is replaced by ``tap(layer, args, kwargs)``
    (which must return what the layer returns); this needs a functional/sequential model.
    """

    def __init__(self, model, preprocess, groups, description="", mode=None):
        self.model = model
        self.preprocess = preprocess
        #: the preprocess mode as applied (:func:`resolved_mode`; ``auto``: an application's own); None unknown
        self.preprocess_mode = mode
        self.groups = groups
        self.description = description
        #: where the model came from (a file path or name, or the user's Keras object); None unknown
        self.source = None
        #: the training run's response diagonal, once read (:func:`influence.model.training_state.response_diagonal`)
        self.training_response = None
        self.variables = [v for g in groups for v in g.variables]
        self.graph = _graph_of(model)
        self._selected = {id(g.layer): g for g in groups}
        self.dtype = tf.as_dtype(self.variables[0].dtype)

    # shapes ----------------------------------------------------------------------------------
    @property
    def input_shape(self):
        """(H, W, C) with None where any size is accepted (a subclassed model: the shape it was built with)."""
        shape = getattr(self.model, "input_shape", None)
        if shape is None:
            shape = next(iter((keras_private.build_shapes(self.model) or {}).values()), None)
        if shape is None:
            raise UserError("cannot tell the model's input size: call the model once on an image batch before saving it")
        return tuple(shape[1:])

    @property
    def num_classes(self):
        return int(self.model.output_shape[-1])

    @property
    def num_params(self):
        return vec_size(self.variables)

    @property
    def takes_float_input(self):
        """True when float arrays are the model's input as they are (preprocess ``none``): the derivatives
        may then take float images (:class:`influence.model.derivatives.Derivatives`, ``float_input``)."""
        return self.preprocess_mode == "none"

    @property
    def supports_tap(self):
        return self.graph is not None

    # forward ---------------------------------------------------------------------------------
    def image_logits(self, x, tap=None):
        """Logits of raw images: uint8 (N, H, W, C) (or float with preprocess ``none``) -> (N, K),
        preprocessing included."""
        return self.logits(tf.cast(self.preprocess(x), self.dtype), tap=tap)

    def logits(self, x, tap=None):
        if tap is None or self.graph is None:
            return self.model(x, training=False)
        return self._run(self.graph, x, tap)

    def _run(self, graph, x, tap):
        def operation_fn(op):
            def call(*args, **kwargs):
                if keras_private.takes_training(op):
                    kwargs["training"] = False
                if id(op) in self._selected:
                    return tap(op, args, kwargs)
                inner = _graph_of(op) if hasattr(op, "layers") else None
                if inner is not None and any(id(l) in self._selected for l in leaf_layers(op)):
                    kwargs.pop("training", None)
                    return self._run(inner, args[0], tap)
                return op(*args, **kwargs)

            return call

        out = keras_private.run_through_graph(graph, [x], operation_fn)
        return out[0] if isinstance(out, (list, tuple)) else out


def check_classifier(clf, probe_size=224, seed=0):
    """Refuse, before any heavy work, a model whose logits the influence math cannot use.

    Runs 2 random uint8 images (``clf.input_shape``; ``probe_size`` for a free height or width)
    through ``clf.image_logits`` under a gradient tape. Raises UserError when

    * the output is not (batch, K), or K = 1 (a binary model);
    * every output row is >= 0 and sums to 1: probabilities from a softmax that
      :func:`strip_softmax` could not remove (a Lambda layer, a subclassed model);
    * a selected layer gets no gradient from the logits (it is off the path to the output).
    """
    shape = tuple(probe_size if d is None else int(d) for d in clf.input_shape)
    x = tf.constant(np.random.default_rng(seed).integers(0, 256, (2,) + shape, dtype=np.uint8))
    primals = [v.value for v in clf.variables]
    with tf.GradientTape() as tape:
        tape.watch(primals)
        logits = clf.image_logits(x)
        total = tf.reduce_sum(logits)
    out = np.asarray(logits, dtype=np.float64)
    if out.ndim != 2:
        raise UserError(f"the model's output for 2 images has shape {out.shape}: a classifier's is (batch, classes)")
    if out.shape[1] == 1:
        raise UserError(f"the model has one output unit: {_BINARY_HINT}")
    if np.all(out >= 0) and np.allclose(out.sum(axis=1), 1.0, rtol=0, atol=1e-4):
        raise UserError("the model's outputs are probabilities (they sum to 1) but no final softmax could be "
                        "stripped (a Lambda layer or a subclassed model?): end the model in a Dense layer with "
                        "activation='softmax' or a Softmax layer, or make it output logits")
    grads, at, cut = tape.gradient(total, primals), 0, []
    for group in clf.groups:
        if any(g is None for g in grads[at:at + len(group.variables)]):
            cut.append(group.name)
        at += len(group.variables)
    if cut:
        reach = [g.name for g in clf.groups if g.name not in cut]
        raise SettingError("params", f"no gradient flows from the model's output to layer(s) {', '.join(cut)} "
                                     f"(off the path to the logits): leave them out"
                                     + (f" (selected layers that reach it: {', '.join(reach)})" if reach else ""))


#: how the user of each face gets training images of the model's size: calculate.py's ``data`` (archives
#: made by prepare_data.py) and the Python API's ``train`` argument
_RESIZE = {"data": "run prepare_data.py again with --size {h} {w}", "train": "resize them to {h}x{w}"}


def check_training_set(clf, train, setting="train"):
    """Refuse, before any work, training images the model cannot take or labels it has no output for.

    The one check of the training set for both faces: :class:`influence.Influence` (``setting="train"``,
    its argument) and calculate.py (``"data"``, the folder of its archives: :func:`influence.engine.check_compatible`).
    Either gets the same :class:`SettingError` naming its setting, the same message but for how to resize.
    ``train``: anything with ``image_shape`` (H, W, C) and ``labels()`` (N,).
    """
    message = image_shape_problem(clf.input_shape, train.image_shape, _RESIZE.get(setting, _RESIZE["train"]))
    message = message or label_problem("training label", train.labels(), clf.num_classes)
    if message:
        raise SettingError(setting, message)


def image_shape_problem(want, shape, resize):
    """What is wrong with training images of ``shape`` (H, W, C) for a model taking ``want`` (None: nothing);
    ``resize``: the hint, formatted with the model's ``h`` and ``w``."""
    have = tuple(shape)
    if len(want) == 3 and want[2] is not None and len(have) == 3 and want[2] != have[2]:
        return (f"the model takes {want[2]}-channel images but the training images are {have[2]}-channel: "
                f"give a model with {have[2]} input channels")
    if len(want) != 3 or len(have) != 3 or any(w is not None and w != h for w, h in zip(want, have)):
        shown = "x".join("?" if w is None else str(w) for w in want)
        return (f"the training images are {'x'.join(map(str, have))} but the model takes {shown}: "
                + resize.format(h=want[0], w=want[1]))
    return None


def label_problem(what, y, k):
    """What is wrong with labels ``y`` (``what`` names one in the message) for a model of ``k`` outputs:
    each must be in 0..k-1, checked before any work (a GPU would turn a bad one into silent NaN); None: nothing."""
    y = np.asarray(y)
    if not len(y):
        return None
    lo, hi = int(y.min()), int(y.max())
    if lo < 0:
        return f"{what} {lo} is negative; labels are class indices 0..{k - 1}"
    if hi >= k:
        return f"{what} {hi} does not exist in a model with {k} outputs (0..{k - 1})"
    return None


#: compute dtypes below float32: influence arithmetic never runs in them (gradients of a confident
#: model underflow in float16, and 1 - p_y cancels)
LOW_PRECISION = ("float16", "bfloat16")


def _all_layers(model):
    """Every layer of ``model``, nested models' layers included (depth first)."""
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_all_layers(layer))
    return out


def at_least_float32(model):
    """``model`` computing in at least float32: a mixed-precision model (a ``mixed_float16`` or
    ``mixed_bfloat16`` policy: float32 weights, 16-bit compute) has its layers switched to the
    float32 policy in memory (the file is only read; the weights are the same numbers). Returns
    ``(model, note)``; ``note`` is "" when nothing changed.

    Raises UserError for 16-bit weights (a ``float16`` policy): cast them to float32 first.
    """
    low_vars = sorted({v.path for v in model.weights if str(v.dtype) in LOW_PRECISION})
    if low_vars:
        raise UserError(f"the model stores its weights in {model.weights[0].dtype} ({low_vars[0]}, ...): influence "
                        "needs float32 weights; rebuild it with dtype='float32' (or a mixed policy) and load the "
                        "weights into it")
    switched = {}
    for layer in _all_layers(model):
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and str(getattr(policy, "compute_dtype", "")) in LOW_PRECISION:
            switched[policy.name] = switched.get(policy.name, 0) + 1
            layer.dtype_policy = "float32"
    if not switched:
        return model, ""
    kinds = ", ".join(f"{n} layer(s) {name}" for name, n in switched.items())
    return model, f"mixed precision ({kinds}): gradients and scores are computed in float32"


def load_classifier(model="vgg16", weights="imagenet", preprocess="auto", params="all"):
    """Everything ``calculate.py`` needs about the model, from its command-line settings.

    The final softmax is stripped on the in-memory model (the file is only read), and the result
    is checked with :func:`check_classifier`.
    """
    keras_model, app_fn = load_keras_model(model, weights)
    keras_model, precision_note = at_least_float32(keras_model)
    if precision_note:
        log.info("model %s: %s", model, precision_note)
    keras_model, softmax_note = strip_softmax(keras_model)
    log.info("model %s: %s", model, softmax_note)
    groups = select_params(keras_model, params)
    mode = preprocess
    if mode == "auto" and app_fn is None:
        mode = "none"
    clf = Classifier(keras_model, make_preprocess(mode, app_fn), groups, description=f"{model} ({softmax_note})",
                     mode=resolved_mode(mode, app_fn))
    clf.source = model          # where it came from: damping optimizer reads its training state there
    check_classifier(clf)
    return clf
