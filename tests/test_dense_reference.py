"""The LDS panel's dense Gauss–Newton reference equals the tool's own ``solver="exact", hessian="ggn"``."""
import keras
import numpy as np
import pytest

import influence
from engine_helpers import CLASSES, IMAGE, random_data, write_train_archive
from influence.errors import SettingError
from influence.experiments.dense_reference import dense_ggn, loss_gradients, reference_scores

DAMPINGS = (1e-3, 0.1)


def tiny_model(seed=1):
    """float64 Conv(tanh, L2 kernel) -> BatchNorm -> Flatten -> Dense(softmax, L2 kernel AND bias): 286
    parameters, a regularised and an unregularised bias, a layer that is neither Dense nor Conv."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input(IMAGE),
        keras.layers.Conv2D(3, 3, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-3),
                            dtype="float64", name="conv"),
        keras.layers.BatchNormalization(dtype="float64", name="bn"),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(CLASSES, activation="softmax", kernel_regularizer=keras.regularizers.L2(1e-3),
                           bias_regularizer=keras.regularizers.L2(5e-3), dtype="float64", name="dense"),
    ])
    bn = model.get_layer("bn")
    rng = np.random.default_rng(seed)
    bn.moving_mean.assign(rng.uniform(-0.2, 0.2, 3))
    bn.moving_variance.assign(rng.uniform(0.5, 1.5, 3))
    return model


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_reference")
    x, y = random_data(24, seed=3)
    archive = write_train_archive(root / "train.npz", x, y, batch=10)
    xt, yt = random_data(3, seed=4)
    return dict(root=root, model=tiny_model(), archive=archive, x=x, y=y, xt=xt, yt=yt)


@pytest.mark.slow
def test_reference_scores_equal_the_exact_gauss_newton_solver(problem):
    p = problem
    cache = p["root"] / "curvature"          # the second damping reuses the exact solver's matrix
    tool = {}
    clf = None
    for lam in DAMPINGS:
        inf = influence.Influence(p["model"], train=p["archive"], solver="exact", hessian="ggn", damping=lam,
                                  preprocess="unit", cache=cache, progress=False)
        tool[lam] = inf.scores(p["xt"], p["yt"])
        clf = inf.clf
    g, g_train = dense_ggn(clf, p["x"], p["y"], chunk=7)        # chunks that do not divide N
    assert g.shape == (clf.num_params, clf.num_params) == (286, 286) and g.dtype == np.float64
    assert np.array_equal(g, g.T) and np.linalg.eigvalsh(g)[0] > 0
    g_test = loss_gradients(clf, p["xt"], p["yt"])
    ours = reference_scores(g, g_test, g_train, DAMPINGS)
    assert sorted(ours) == sorted(DAMPINGS)
    for lam in DAMPINGS:
        assert ours[lam].shape == (3, 24) and ours[lam].dtype == np.float64
        np.testing.assert_allclose(ours[lam], tool[lam], rtol=1e-6, atol=1e-7 * np.abs(tool[lam]).max())
    # the dampings matter at this size: the reference is no identity-curvature row
    assert not np.allclose(ours[DAMPINGS[0]] * DAMPINGS[0], ours[DAMPINGS[1]] * DAMPINGS[1], rtol=0.1)


def test_refused_above_the_parameter_limit_before_any_work(problem):
    from engine_helpers import classifier

    clf = classifier(problem["model"])
    with pytest.raises(SettingError, match="above the limit of 285") as err:
        dense_ggn(clf, problem["x"][:0], problem["y"][:0], max_params=285)
    assert err.value.setting == "max_params" and "286 parameters" in str(err.value)


def test_dampings_must_be_positive():
    g = np.eye(3)
    with pytest.raises(SettingError, match="> 0"):
        reference_scores(g, np.ones((1, 3)), np.ones((2, 3)), [1e-3, 0.0])
    out = reference_scores(2 * g, np.ones((1, 3)), np.eye(3)[:2], [1.0])
    np.testing.assert_allclose(out[1.0], [[1 / 3, 1 / 3]])
