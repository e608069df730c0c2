"""Loading a Keras classifier and seeing it as ``logits(x)`` over a chosen set of parameters.

A :class:`Classifier` wraps a Keras 3 model with three things the influence math needs:

* ``preprocess(x_uint8)`` -- the model's own input transform, run inside TensorFlow graphs;
* ``logits(x, tap)`` -- the forward pass with a final softmax stripped, optionally letting a *tap*
  take over the call of each selected layer (the per-layer score split uses this);
* ``groups`` -- the selected parameters, grouped by the layer that owns them (``--params``).
"""
import logging
import os
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from influence.errors import UserError
from influence.hvp import vec_size

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

    ``mode``: ``none`` (cast only), ``unit`` (x / 255), ``caffe`` (BGR, minus ImageNet mean),
    ``tf`` (x / 127.5 - 1), ``torch`` (x / 255, ImageNet mean/std), or ``auto`` (the
    ``keras.applications`` model's own ``preprocess_input``; ``none`` for a model file).
    """
    if mode not in PREPROCESS_MODES:
        raise UserError(f"unknown --preprocess {mode!r}; choose one of {', '.join(PREPROCESS_MODES)}")
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
        return lambda x: tf.cast(x, tf.float32)
    if mode == "unit":
        return lambda x: tf.cast(x, tf.float32) / 255.0
    from keras.applications import imagenet_utils

    return lambda x: imagenet_utils.preprocess_input(tf.cast(x, tf.float32), mode=mode)


# ----------------------------------------------------------------------------- loading

def application_names():
    """Lower-case name -> constructor for every model in ``keras.applications``."""
    apps = {}
    for name in dir(keras.applications):
        fn = getattr(keras.applications, name)
        if callable(fn) and name[:1].isupper():
            apps[name.lower()] = fn
    return apps


def _weights_hint(name):
    cache = os.path.join(os.path.expanduser("~"), ".keras", "models")
    return (
        f"could not get the ImageNet weights for {name} (no internet?): put the weights file in "
        f"{cache}/ or pass --weights PATH (or --weights none for random weights), "
        f"or use --model path/to/model.keras"
    )


def load_keras_model(name, weights="imagenet"):
    """Load ``name`` (a ``keras.applications`` name such as ``vgg16``, or a ``.keras``/``.h5`` path).

    ``weights``: ``imagenet`` (download, cached by Keras), ``none`` (random), or a file path.
    Returns ``(model, application_fn or None)``.
    """
    if os.path.splitext(name)[1].lower() in (".keras", ".h5", ".hdf5") or os.path.exists(name):
        if not os.path.exists(name):
            raise UserError(f"model file not found: {name}")
        try:
            model = keras.models.load_model(name, compile=False)
        except Exception as exc:  # Keras raises many kinds here; the user needs one line
            raise UserError(f"could not load model {name}: {str(exc).splitlines()[0]}") from None
        return model, None
    apps = application_names()
    fn = apps.get(name.lower())
    if fn is None:
        raise UserError(
            f"unknown --model {name!r}: give a .keras/.h5 file or a keras.applications name "
            f"(e.g. vgg16, resnet50, mobilenetv2)"
        )
    if weights is None or str(weights).lower() == "none":
        log.warning("using RANDOM weights for %s (--weights none): scores mean nothing for a real model", name)
        return fn(weights=None), fn
    if weights != "imagenet" and not os.path.exists(weights):
        raise UserError(f"--weights file not found: {weights}")
    try:
        return fn(weights=weights), fn
    except Exception as exc:
        if weights == "imagenet":
            raise UserError(_weights_hint(name)) from None
        raise UserError(f"could not load weights {weights} into {name}: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- the graph

def _is_softmax(activation):
    if activation is None:
        return False
    name = getattr(activation, "__name__", "") or type(activation).__name__
    return "softmax" in name.lower()


def _graph_of(model):
    """The Functional graph behind ``model`` (Sequential keeps one), or None for subclassed models."""
    from keras.src.models.functional import Functional

    if isinstance(model, Functional):
        return model
    inner = getattr(model, "_functional", None)
    if isinstance(inner, Functional):
        return inner
    return None


def strip_softmax(model):
    """Make ``model`` output logits. Returns ``(model, what_was_done)``.

    A final layer with a softmax activation gets a linear one (on this in-memory copy only); a final
    ``Softmax``/``Activation('softmax')`` layer is cut off.
    """
    last = model.layers[-1]
    if isinstance(last, (keras.layers.Softmax,)) or (
        isinstance(last, keras.layers.Activation) and _is_softmax(last.activation)
    ):
        graph = _graph_of(model)
        if graph is None:
            raise UserError("the model ends in a Softmax layer and is not a functional model: save it without that layer")
        return keras.Model(graph.inputs, last.input), f"cut the final softmax layer {last.name!r}"
    if _is_softmax(getattr(last, "activation", None)):
        last.activation = keras.activations.linear
        return model, f"stripped the softmax of layer {last.name!r}"
    return model, "no final softmax found: the outputs are taken as logits"


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
            raise UserError(f"--params {spec!r}: N in last:N must be a positive integer")
        chosen = layers[-n:]
    else:
        by_name = {l.name: l for l in layers}
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise UserError(
                f"--params: no layer with weights named {', '.join(unknown)}; "
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

    def __init__(self, model, preprocess, groups, description=""):
        self.model = model
        self.preprocess = preprocess
        self.groups = groups
        self.description = description
        self.variables = [v for g in groups for v in g.variables]
        self.graph = _graph_of(model)
        self._selected = {id(g.layer): g for g in groups}
        self.dtype = tf.as_dtype(self.variables[0].dtype)

    # shapes ----------------------------------------------------------------------------------
    @property
    def input_shape(self):
        """(H, W, C) with None where any size is accepted."""
        return tuple(self.model.input_shape[1:])

    @property
    def num_classes(self):
        return int(self.model.output_shape[-1])

    @property
    def num_params(self):
        return vec_size(self.variables)

    @property
    def supports_tap(self):
        return self.graph is not None

    # forward ---------------------------------------------------------------------------------
    def image_logits(self, x, tap=None):
        """Logits of raw images: uint8 (N, H, W, C) -> (N, K), preprocessing included."""
        return self.logits(tf.cast(self.preprocess(x), self.dtype), tap=tap)

    def logits(self, x, tap=None):
        if tap is None or self.graph is None:
            return self.model(x, training=False)
        return self._run(self.graph, x, tap)

    def _run(self, graph, x, tap):
        def operation_fn(op):
            def call(*args, **kwargs):
                if "training" in getattr(op, "_call_context_args", {}) or getattr(op, "_call_has_training_arg", False):
                    kwargs["training"] = False
                if id(op) in self._selected:
                    return tap(op, args, kwargs)
                inner = _graph_of(op) if hasattr(op, "layers") else None
                if inner is not None and any(id(l) in self._selected for l in leaf_layers(op)):
                    kwargs.pop("training", None)
                    return self._run(inner, args[0], tap)
                return op(*args, **kwargs)

            return call

        out = graph._run_through_graph([x], operation_fn=operation_fn)
        return out[0] if isinstance(out, (list, tuple)) else out


def load_classifier(model="vgg16", weights="imagenet", preprocess="auto", params="all"):
    """Everything ``calculate.py`` needs about the model, from its command-line settings."""
    keras_model, app_fn = load_keras_model(model, weights)
    keras_model, softmax_note = strip_softmax(keras_model)
    log.info("model %s: %s", model, softmax_note)
    groups = select_params(keras_model, params)
    mode = preprocess
    if mode == "auto" and app_fn is None:
        mode = "none"
    clf = Classifier(keras_model, make_preprocess(mode, app_fn), groups, description=f"{model} ({softmax_note})")
    return clf
