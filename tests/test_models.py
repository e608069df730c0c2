"""Tests of influence/model/models.py: stripping a final softmax wherever it ends the model, and refusing
models the influence math cannot use (binary, probabilities left over, layers off the logits path)."""
import hashlib

import numpy as np
import pytest

from engine_helpers import per_example_gradients, to_vec  # noqa: F401  (also sets TF_CPP_MIN_LOG_LEVEL)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from influence.errors import SettingError, UserError  # noqa: E402
from influence.model.derivatives import Derivatives  # noqa: E402
from influence.model.vectors import vec_to_numpy
from influence.model.models import (Classifier, check_classifier, load_classifier, make_preprocess,  # noqa: E402
                              select_params, strip_softmax)
from influence.scoring import Scorer  # noqa: E402

SHAPE = (4, 4, 3)
Dense, Activation = keras.layers.Dense, keras.layers.Activation


def _sequential(*ending, dtype="float32"):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(name="flat", dtype=dtype),
                             Dense(5, activation="tanh", name="hidden", dtype=dtype), *ending])


def _functional_nested_softmax():
    keras.utils.set_random_seed(0)
    z = keras.Input((5,))
    head = keras.Model(z, keras.layers.Softmax()(Dense(3, name="out")(z)), name="head")
    x = keras.Input(SHAPE)
    return keras.Model(x, head(Dense(5, activation="tanh", name="hidden")(keras.layers.Flatten()(x))))


ENDINGS = {
    "Dense(softmax)": lambda: _sequential(Dense(3, activation="softmax", name="out")),
    "Dense(tf.nn.softmax)": lambda: _sequential(Dense(3, activation=tf.nn.softmax, name="out")),
    "Activation('softmax')": lambda: _sequential(Dense(3, name="out"), Activation("softmax")),
    "Activation(keras.activations.softmax)": lambda: _sequential(Dense(3, name="out"),
                                                                 Activation(keras.activations.softmax)),
    "Softmax()": lambda: _sequential(Dense(3, name="out"), keras.layers.Softmax()),
    "nested Sequential([Dense(softmax)])": lambda: _sequential(
        keras.Sequential([Dense(3, activation="softmax", name="out")], name="head")),
    "nested Sequential([Dense, Activation('softmax')])": lambda: _sequential(
        keras.Sequential([Dense(3, name="out"), Activation("softmax")], name="head")),
    "Sequential nested twice": lambda: _sequential(
        keras.Sequential([keras.Sequential([Dense(3, activation="softmax", name="out")], name="inner")],
                         name="head")),
    "nested Functional ending in Softmax()": _functional_nested_softmax,
}


def _images(n=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n,) + SHAPE).astype(np.float32)


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_softmax_is_stripped_wherever_it_ends_the_model_and_the_model_is_left_as_it_is(ending):
    model = ENDINGS[ending]()
    x = _images()
    probs = np.asarray(model(x))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    weights = [w.copy() for w in model.get_weights()]

    logits_model, note = strip_softmax(model)
    logits = np.asarray(logits_model(x))
    assert "softmax" in note and "no final softmax" not in note, note
    assert not np.allclose(logits.sum(axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(keras.ops.softmax(logits)), probs, rtol=1e-5, atol=1e-7)
    # the model passed in still outputs probabilities: only a copy was changed
    np.testing.assert_allclose(np.asarray(model(x)), probs, rtol=1e-6)
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert [g.name for g in select_params(logits_model, "all")] == ["hidden", "out"]
    check_classifier(Classifier(logits_model, make_preprocess("unit"), select_params(logits_model, "all")))


def test_a_model_without_softmax_is_returned_unchanged():
    model = _sequential(Dense(3, name="out"))
    same, note = strip_softmax(model)
    assert same is model and note == "no final softmax found: the outputs are taken as logits"


def test_load_classifier_strips_a_nested_softmax_without_touching_the_file(tmp_path):
    path = tmp_path / "nested.keras"
    ENDINGS["nested Sequential([Dense(softmax)])"]().save(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    clf = load_classifier(str(path), preprocess="unit")
    assert "stripped the softmax of layer 'head/out'" in clf.description
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    x = np.random.default_rng(1).integers(0, 256, (4,) + SHAPE, dtype=np.uint8)
    probs = np.asarray(keras.models.load_model(path, compile=False)(x.astype(np.float32) / 255.0))
    logits = np.asarray(clf.image_logits(x))
    np.testing.assert_allclose(np.asarray(keras.ops.softmax(logits)), probs, rtol=1e-5, atol=1e-7)


def test_scores_through_a_stripped_nested_model_equal_the_gradient_loop():
    """The per-layer split taps into the rebuilt nested model: shares still add up to ∇L_i · s."""
    model = _sequential(keras.Sequential([Dense(4, activation="softmax", name="out", dtype="float64")],
                                         name="head"), dtype="float64")
    model, _ = strip_softmax(model)
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"))
    d = Derivatives(clf, SHAPE)
    scorer = Scorer(d)
    assert scorer.split and scorer.layer_names == ["hidden", "out"]
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (6,) + SHAPE, dtype=np.uint8)
    y = rng.integers(0, 4, 6).astype(np.int64)
    s = rng.standard_normal(clf.num_params)
    shares = scorer.shares_for(x, y, [to_vec(s, d)])
    np.testing.assert_allclose(shares.sum(-1)[0], per_example_gradients(d, x, y) @ s, rtol=1e-9, atol=1e-12)


class _SoftmaxNet(keras.Model):
    """Subclassed: cannot be rewired, so its probabilities must be refused, not taken as logits."""

    def __init__(self, units=3, activation="softmax"):
        super().__init__()
        self.flat = keras.layers.Flatten()
        self.out = Dense(units, activation=activation)

    def call(self, x):
        return self.out(self.flat(x))


@pytest.mark.parametrize("make", [
    lambda: _sequential(Dense(3, name="out"), keras.layers.Lambda(lambda t: keras.ops.softmax(t), name="probs")),
    lambda: _SoftmaxNet(),
], ids=["Lambda(softmax)", "subclassed Dense(softmax)"])
def test_probabilities_that_cannot_be_stripped_are_a_clear_error(make):
    model = make()
    model(_images(1))
    model, note = strip_softmax(model)
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"))
    with pytest.raises(UserError, match="outputs are probabilities.*no final softmax could be stripped"):
        check_classifier(clf)


@pytest.mark.parametrize("ending", [
    [Dense(1, activation="sigmoid")],
    [Dense(1)],
    [Dense(3, activation="sigmoid", name="multi")],
    [Dense(2), Activation("sigmoid")],
    [keras.Sequential([Dense(2, activation="sigmoid")])],
], ids=["Dense(1, sigmoid)", "Dense(1)", "Dense(3, sigmoid)", "Activation('sigmoid')", "nested sigmoid"])
def test_binary_and_sigmoid_models_are_refused(ending):
    with pytest.raises(UserError, match="binary models with one output unit .*are not supported: give the model two "
                                        "outputs with softmax"):
        strip_softmax(_sequential(*ending))


def test_binary_model_file_and_subclassed_one_unit_model_are_refused(tmp_path):
    path = tmp_path / "binary.keras"
    _sequential(Dense(1, activation="sigmoid")).save(path)
    with pytest.raises(UserError, match="one output unit"):
        load_classifier(str(path), preprocess="unit")
    net = _SoftmaxNet(units=1, activation=None)
    net(_images(1))
    with pytest.raises(UserError, match="one output unit"):
        check_classifier(Classifier(net, make_preprocess("unit"), select_params(net, "all")))


def test_several_outputs_are_refused():
    x = keras.Input(SHAPE)
    h = keras.layers.Flatten()(x)
    with pytest.raises(UserError, match="2 outputs"):
        strip_softmax(keras.Model(x, [Dense(3)(h), Dense(2)(h)]))


def _side_branch_model():
    """'side' feeds the logits only through stop_gradient: its weights get no gradient."""
    keras.utils.set_random_seed(0)
    x = keras.Input(SHAPE)
    h = keras.layers.Flatten()(x)
    side = Dense(3, name="side", dtype="float64")(h)
    joined = keras.layers.Concatenate()([h, keras.ops.stop_gradient(side)])
    return keras.Model(x, Dense(4, name="head", dtype="float64")(joined))


def test_a_selected_layer_off_the_logits_path_is_named_at_set_up():
    model = _side_branch_model()
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"))
    with pytest.raises(UserError, match=r"no gradient flows .* layer\(s\) side .*reach it: head"):
        check_classifier(clf)
    check_classifier(Classifier(model, make_preprocess("unit"), select_params(model, "head")))


def test_gradient_of_an_unconnected_variable_is_zero_not_none():
    model = _side_branch_model()
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"))
    d = Derivatives(clf, SHAPE)
    x = np.random.default_rng(3).integers(0, 256, (2,) + SHAPE, dtype=np.uint8)
    grad = d.gradient(x, np.array([0, 3], np.int64))
    assert all(g is not None for g in grad)
    flat = vec_to_numpy(grad)
    side = sum(int(np.prod(v.shape)) for v in clf.groups[0].variables)
    assert clf.groups[0].name == "side"
    np.testing.assert_array_equal(flat[:side], 0.0)
    assert np.abs(flat[side:]).max() > 0


@pytest.mark.slow
def test_random_weights_are_seeded_so_reruns_and_workers_agree():
    """--weights none builds the same weights every time (the curvature cache and Ray workers rely on it)."""
    from influence.model.keras_models import load_keras_model

    first, _ = load_keras_model("mobilenetv2", "none")
    np.random.default_rng().random()                         # other random state in between changes nothing
    keras.utils.set_random_seed(12345)
    second, _ = load_keras_model("mobilenetv2", "none")
    for a, b in zip(first.weights[:5] + first.weights[-2:], second.weights[:5] + second.weights[-2:]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_training_set_check_speaks_to_each_face():
    """check_training_set: one SettingError naming the face's setting (calculate.py's data, the API's train),
    the same words but for how to resize (prepare_data.py for the archives, the arrays for the API)."""
    from types import SimpleNamespace

    from influence.model.models import check_training_set

    clf = SimpleNamespace(input_shape=(8, 8, 3), num_classes=3)
    fine = SimpleNamespace(image_shape=(8, 8, 3), labels=lambda: np.array([0, 2, 1]))
    check_training_set(clf, fine, "data")
    check_training_set(clf, fine)
    free = SimpleNamespace(input_shape=(None, None, 3), num_classes=3)       # any size: only the channels count
    check_training_set(free, SimpleNamespace(image_shape=(5, 7, 3), labels=lambda: np.array([0])), "data")
    cases = [((6, 6, 3), [0], "data", "^data: the training images are 6x6x3 but the model takes 8x8x3: run "
                                      "prepare_data.py again with --size 8 8$"),
             ((6, 6, 3), [0], "train", "^train: the training images are 6x6x3 but the model takes 8x8x3: resize "
                                       "them to 8x8$"),
             ((8, 8, 1), [0], "data", "^data: the model takes 3-channel images but the training images are "
                                      "1-channel: give a model with 1 input channels$"),
             ((8, 8, 3), [0, 3], "data", r"^data: training label 3 does not exist in a model with 3 outputs \(0..2\)$"),
             ((8, 8, 3), [-2, 1], "train", "^train: training label -2 is negative; labels are class indices 0..2$")]
    for shape, labels, setting, message in cases:
        train = SimpleNamespace(image_shape=shape, labels=lambda labels=labels: np.array(labels))
        with pytest.raises(SettingError, match=message):
            check_training_set(clf, train, setting)
