"""Every use of Keras's private API, in one place.

Rewiring a loaded model (cutting a final softmax, running a functional graph with some layer calls
taken over by :class:`influence.model.taps.Tap`) needs parts of Keras that are not public:
``keras.src`` classes, the node that made a symbolic tensor, ``Function._run_through_graph`` and
a few underscore attributes of layers (and of optimizers: their slots, a learning-rate schedule). Keras
may change any of them in a minor release, so they are all reached through the small functions below
(``tests/test_names.py`` finds any other), written against Keras 3.15 (``requirements.txt`` caps
Keras at that minor; ``tests/test_keras_private.py`` runs each function on a real model). When one
is gone, the function raises :class:`UserError` with one line naming the installed Keras version,
instead of a traceback from deep inside the influence math.
"""
import importlib
import inspect

import keras

from influence.errors import UserError

TESTED_WITH = "3.15"
"""The Keras minor version this module was written and tested against."""


def gone(name):
    """The UserError for a private Keras ``name`` that the installed Keras no longer has."""
    major, minor = TESTED_WITH.split(".")
    return UserError(f"Keras {keras.__version__} no longer has {name} (influence was tested with Keras "
                     f"{TESTED_WITH}); install keras<{major}.{int(minor) + 1} (pip install -r requirements.txt)")


def _import(module, name):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise gone(f"{module}.{name}") from None


def _attribute(obj, attr, owner):
    """``obj.<attr>``; ``owner`` names the class that should have it in the message."""
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise gone(f"{owner}.{attr}") from None


def functional_class():
    """``keras.src.models.functional.Functional``: the class of models that carry a layer graph."""
    return _import("keras.src.models.functional", "Functional")


def base_conv_class():
    """``keras.src.layers.convolutional.base_conv.BaseConv``: the base of Conv1D/2D/3D."""
    return _import("keras.src.layers.convolutional.base_conv", "BaseConv")


def sequential_graph(model):
    """``model._functional``: the Functional graph a built Sequential keeps (None while it is unbuilt,
    and None for a model that is not a Sequential and has no such attribute)."""
    if isinstance(model, keras.Sequential):
        return _attribute(model, "_functional", "keras.Sequential")
    return getattr(model, "_functional", None)


def producing_call(tensor):
    """``(operation, args, kwargs)`` of the call that computed the symbolic ``tensor`` of a functional
    graph, from ``tensor._keras_history`` and the operation's ``_inbound_nodes``."""
    history = _attribute(tensor, "_keras_history", "keras.KerasTensor")
    try:
        operation, index = history.operation, history.node_index
    except AttributeError:
        raise gone("keras.KerasTensor._keras_history.operation/node_index") from None
    node = _attribute(operation, "_inbound_nodes", "keras.Operation")[index]
    try:
        return node.operation, node.arguments.args, node.arguments.kwargs
    except AttributeError:
        raise gone("keras.src.ops.node.Node.operation/arguments") from None


def takes_training(operation):
    """Whether ``operation`` should be called with ``training=False``: a layer's ``_call_context_args``
    holds "training" (every Layer in Keras 3.15), or its ``call`` has a ``training`` argument
    (``_call_has_training_arg``). Operations that are not layers (``keras.ops`` calls) do not."""
    if not isinstance(operation, keras.layers.Layer):
        return False
    return ("training" in _attribute(operation, "_call_context_args", "keras.layers.Layer")
            or bool(_attribute(operation, "_call_has_training_arg", "keras.layers.Layer")))


def build_shapes(model):
    """``model._build_shapes_dict``: the shapes a subclassed model was built with (None if unbuilt)."""
    return _attribute(model, "_build_shapes_dict", "keras.layers.Layer")


def run_through_graph(graph, inputs, operation_fn):
    """``graph._run_through_graph(inputs, operation_fn=operation_fn)``: run the Functional ``graph`` on
    ``inputs`` (a list, one tensor per graph input), calling ``operation_fn(op)(*args, **kwargs)`` at
    every node instead of ``op(*args, **kwargs)``. Returns the graph's outputs."""
    run = _attribute(graph, "_run_through_graph", "keras.src.ops.function.Function")
    try:
        takes_fn = "operation_fn" in inspect.signature(run).parameters
    except (TypeError, ValueError):
        takes_fn = False
    if not takes_fn:
        raise gone("keras.src.ops.function.Function._run_through_graph(operation_fn=...)")
    return run(inputs, operation_fn=operation_fn)


def optimizer_slot(optimizer, variable, slots):
    """The value of ``optimizer.<slots>[i]`` (e.g. ``"_velocities"``: Adam's second moments) for the trained
    ``variable``, ``i`` from ``optimizer._get_variable_index`` (Keras 3.15's optimizers keep their slots in
    lists indexed by the variable)."""
    index = _attribute(optimizer, "_get_variable_index", "keras.optimizers.Optimizer")(variable)
    return _attribute(optimizer, slots, type(optimizer).__name__)[index].numpy()


def learning_rate(optimizer):
    """``optimizer._learning_rate``: the learning rate as given, a schedule kept as the schedule (the public
    ``learning_rate`` is its value at the current step); the public one for an optimizer without it."""
    return optimizer._learning_rate if hasattr(optimizer, "_learning_rate") else optimizer.learning_rate
