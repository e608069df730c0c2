"""Tests of influence/model/keras_private.py: each entry point on a tiny real Keras model, and the one-line
UserError naming the installed Keras version when a private name it reaches is gone."""
import pathlib
import re
import sys

import numpy as np
import pytest

from engine_helpers import IMAGE  # noqa: F401  (also sets TF_CPP_MIN_LOG_LEVEL)
import keras  # noqa: E402

from influence.errors import UserError  # noqa: E402
from influence.model import keras_private as kp  # noqa: E402
from influence.model.models import Classifier, make_preprocess, select_params  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
Dense = keras.layers.Dense


def _functional():
    """x -> Flatten -> Dense 'hidden' -> Dropout -> Dense 'out' -> Softmax 'probs'."""
    keras.utils.set_random_seed(0)
    x = keras.Input((3, 2), name="x")
    h = Dense(4, activation="tanh", name="hidden")(keras.layers.Flatten(name="flat")(x))
    z = Dense(3, name="out")(keras.layers.Dropout(0.5, name="drop")(h))
    return keras.Model(x, keras.layers.Softmax(name="probs")(z), name="functional")


def _sequential(build=True):
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Flatten(name="flat"), Dense(4, activation="tanh", name="hidden"), Dense(3, name="out")]
    return keras.Sequential(([keras.Input((3, 2))] if build else []) + layers, name="sequential")


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.dense = Dense(3, name="out")

    def call(self, x):
        return self.dense(keras.ops.reshape(x, (-1, 6)))


def _x(n=2):
    return np.random.default_rng(0).uniform(-1, 1, (n, 3, 2)).astype(np.float32)


# ----------------------------------------------------------------------------- each entry point

def test_functional_class_is_the_class_of_functional_models_only():
    functional = kp.functional_class()
    assert isinstance(_functional(), functional)
    assert not isinstance(_sequential(), functional)
    assert not isinstance(_Subclassed(), functional)


def test_base_conv_class_is_the_base_of_the_conv_layers_and_not_of_dense():
    base = kp.base_conv_class()
    for conv in (keras.layers.Conv1D(2, 3), keras.layers.Conv2D(2, 3), keras.layers.Conv3D(2, 3)):
        assert isinstance(conv, base)
    assert not isinstance(Dense(2), base)


def test_sequential_graph_is_the_functional_graph_a_built_sequential_keeps():
    model = _sequential()
    graph = kp.sequential_graph(model)
    assert isinstance(graph, kp.functional_class())
    assert [l.name for l in graph.layers if l.weights] == ["hidden", "out"]
    np.testing.assert_allclose(np.asarray(graph(_x())), np.asarray(model(_x())), rtol=1e-6)
    assert kp.sequential_graph(_sequential(build=False)) is None  # not built yet: no graph
    assert kp.sequential_graph(_functional()) is None  # no such attribute outside Sequential
    assert kp.sequential_graph(_Subclassed()) is None


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_producing_call_is_the_layer_call_that_made_a_tensor(kind):
    model = _functional() if kind == "functional" else _sequential()
    graph = model if kind == "functional" else kp.sequential_graph(model)
    op, args, kwargs = kp.producing_call(graph.outputs[0])
    last = "probs" if kind == "functional" else "out"
    assert op is model.get_layer(last)
    assert len(args) == 1 and all(v is None for v in kwargs.values())  # Softmax gets mask=None
    before = "out" if kind == "functional" else "hidden"
    op_before, _, _ = kp.producing_call(args[0])
    assert op_before is model.get_layer(before)


def test_takes_training_is_true_for_layers_and_false_for_plain_ops():
    x = keras.Input((3,))
    y = keras.ops.add(x, 1.0)
    add, _, _ = kp.producing_call(y)
    assert not isinstance(add, keras.layers.Layer)
    assert kp.takes_training(add) is False
    assert kp.takes_training(keras.layers.Dropout(0.5)) is True  # its call has a training argument
    assert kp.takes_training(Dense(2)) is True  # "training" is a call-context argument of every layer


def test_build_shapes_are_the_shapes_a_subclassed_model_was_built_with():
    model = _Subclassed()
    assert kp.build_shapes(model) is None
    model(_x())
    assert [tuple(s) for s in kp.build_shapes(model).values()] == [(2, 3, 2)]


def test_learning_rate_keeps_a_schedule_as_the_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    assert kp.learning_rate(keras.optimizers.SGD(schedule)) is schedule
    assert float(kp.learning_rate(keras.optimizers.Adam(0.003))) == pytest.approx(0.003)


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_run_through_graph_calls_operation_fn_at_every_node(kind):
    model = _functional() if kind == "functional" else _sequential()
    graph = model if kind == "functional" else kp.sequential_graph(model)
    x = _x()
    seen = []

    def identity(op):
        seen.append(op.name)
        return op

    out = kp.run_through_graph(graph, [x], identity)
    out = out[0] if isinstance(out, (list, tuple)) else out
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(x)), rtol=1e-6)
    assert [n for n in seen if n in ("hidden", "out")] == ["hidden", "out"]

    def zero_hidden(op):  # the "hidden" call taken over: everything after it sees zeros
        if op.name != "hidden":
            return op
        return lambda *args, **kwargs: keras.ops.zeros((args[0].shape[0], 4))

    out = kp.run_through_graph(graph, [x], zero_hidden)
    out = np.asarray(out[0] if isinstance(out, (list, tuple)) else out)
    bias_only = np.asarray(model.get_layer("out").bias)
    expected = np.asarray(keras.ops.softmax(bias_only)) if kind == "functional" else bias_only
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-6)


def test_no_other_module_reaches_private_keras():
    private = re.compile(r"keras\.src|\b_(run_through_graph|keras_history|inbound_nodes|functional|build_shapes_dict|"
                         r"call_context_args|call_has_training_arg)\b")
    files = [*(REPO / "influence").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
    hits = [f"{f.relative_to(REPO)}:{i}" for f in files if f.name != "keras_private.py"
            for i, line in enumerate(f.read_text().splitlines(), 1) if private.search(line)]
    assert not hits, "private Keras API outside influence/model/keras_private.py: " + ", ".join(hits)


# ----------------------------------------------------------------------------- a private name that is gone

def _vanish(monkeypatch, obj, attr):
    """Make ``obj.<attr>`` disappear for this test (an instance attribute of a throwaway object, or a
    class/module attribute restored afterwards)."""
    if isinstance(obj, type) or type(obj).__name__ == "module":
        monkeypatch.delattr(obj, attr)
    else:
        object.__delattr__(obj, attr)
        assert not hasattr(obj, attr)


def _gone_functional(monkeypatch):
    monkeypatch.delattr(sys.modules["keras.src.models.functional"], "Functional")
    return kp.functional_class


def _gone_base_conv(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras.src.layers.convolutional.base_conv", None)  # import fails
    return kp.base_conv_class


def _gone_sequential_graph(monkeypatch):
    model = _sequential()
    _vanish(monkeypatch, model, "_functional")
    return lambda: kp.sequential_graph(model)


def _gone_keras_history(monkeypatch):
    model = _functional()
    _vanish(monkeypatch, model.outputs[0], "_keras_history")
    return lambda: kp.producing_call(model.outputs[0])


def _gone_inbound_nodes(monkeypatch):
    model = _functional()
    _vanish(monkeypatch, model.get_layer("probs"), "_inbound_nodes")
    return lambda: kp.producing_call(model.outputs[0])


def _gone_call_context_args(monkeypatch):
    layer = Dense(2)
    _vanish(monkeypatch, layer, "_call_context_args")
    return lambda: kp.takes_training(layer)


def _gone_build_shapes(monkeypatch):
    model = _Subclassed()
    _vanish(monkeypatch, model, "_build_shapes_dict")
    return lambda: kp.build_shapes(model)


def _gone_run_through_graph(monkeypatch):
    model = _functional()  # built first: Keras itself runs the graph while building one
    monkeypatch.delattr(sys.modules["keras.src.ops.function"].Function, "_run_through_graph")
    return lambda: kp.run_through_graph(model, [_x()], lambda op: op)


GONE = {"functional_class": _gone_functional, "base_conv_class": _gone_base_conv,
        "sequential_graph": _gone_sequential_graph, "producing_call (_keras_history)": _gone_keras_history,
        "producing_call (_inbound_nodes)": _gone_inbound_nodes, "takes_training": _gone_call_context_args,
        "build_shapes": _gone_build_shapes, "run_through_graph": _gone_run_through_graph}


@pytest.mark.parametrize("entry", list(GONE))
def test_a_private_name_that_is_gone_fails_with_one_line_naming_the_keras_version(entry, monkeypatch):
    call = GONE[entry](monkeypatch)
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"Keras {keras.__version__} no longer has "), message
    assert "influence was tested with Keras 3.15" in message and "keras<3.16" in message, message
    assert "pip install -r requirements.txt" in message


def test_the_message_names_the_keras_version_of_the_call(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.17.0")
    monkeypatch.delattr(sys.modules["keras.src.models.functional"], "Functional")
    with pytest.raises(UserError) as err:
        kp.functional_class()
    assert str(err.value) == ("Keras 3.17.0 no longer has keras.src.models.functional.Functional (influence was "
                              "tested with Keras 3.15); install keras<3.16 (pip install -r requirements.txt)")


def test_the_classifier_fails_with_the_one_line_too(monkeypatch):
    """Through models.py: a tapped forward pass whose private graph runner is gone."""
    model = _functional()
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"))
    monkeypatch.delattr(sys.modules["keras.src.ops.function"].Function, "_run_through_graph")
    with pytest.raises(UserError, match=r"^Keras \S+ no longer has keras\.src\.ops\.function\.Function\."
                                        r"_run_through_graph"):
        clf.logits(_x(), tap=lambda layer, args, kwargs: layer(*args, **kwargs))
