"""The Python API (influence.Influence): the numbers of calculate.py, as arrays."""
import logging
import re

import keras
import numpy as np
import pytest

import influence
from engine_helpers import calc_settings, dense_hessian, per_example_gradients, write_project
from influence.data.archive_reader import TestArchive, TrainArchive
from influence.engine import calculate
from influence.errors import SettingError, UserError

DAMPING = 0.05


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_project(tmp_path_factory.mktemp("api"), 24, 10, {"a": 3})


@pytest.mark.slow
def test_scores_equal_calculate_and_the_dense_reference(data, tmp_path):
    x, y, _ = TestArchive(data / "test.npz").read("a")
    inf = influence.Influence(str(data / "model.keras"), train=data / "train.npz", solver="exact", damping=DAMPING,
                              hessian="full", preprocess="unit", progress=False)
    scores = inf.scores(x, y)
    assert scores.shape == (3, 24) and scores.dtype == np.float32
    # calculate.py's files hold the same numbers
    calculate(calc_settings(data, tmp_path / "out", damping=DAMPING, hessian="full"))
    for t in range(3):
        n = int(np.sum(y[:t + 1] == y[t]))
        np.testing.assert_allclose(scores[t], np.load(tmp_path / "out" / "a" / str(int(y[t])) / f"{n}_scores.npy"),
                                   rtol=1e-6, atol=1e-9)
    # and the dense float64 reference
    train = TrainArchive(data / "train.npz")
    xt, yt = train.take(np.arange(len(train)))
    d = inf.derivs
    h = dense_hessian(d, xt, yt.astype(np.int64))
    g_train = per_example_gradients(d, xt, yt.astype(np.int64))
    g_test = per_example_gradients(d, x, y.astype(np.int64))
    inv = np.linalg.inv(h + DAMPING * np.eye(len(h)))
    np.testing.assert_allclose(scores, g_test @ inv @ g_train.T, rtol=1e-5, atol=1e-8)
    # per layer: the shares add up to the totals
    shares, layers = inf.scores(x, y, per_layer=True)
    assert layers == ["conv", "dense"] and shares.shape == (3, 24, 2)
    np.testing.assert_allclose(shares.sum(-1), scores, rtol=1e-6, atol=1e-9)
    # top lists: most negative first in harmful, most positive first in useful, with archive facts
    top = inf.top(scores, k=2)
    assert len(top) == 3 and [r.score for r in top[0]["harmful"]] == sorted(scores[0])[:2]
    best = top[0]["useful"][0]
    assert best.score == scores[0].max() and best.index == int(np.argmax(scores[0]))
    assert best.key == [k for b in train.batches for k in train.keys(b)][best.index]
    assert best.label == int(train.labels()[best.index])
    # self-influence: gᵢᵀ (H + λI)⁻¹ gᵢ
    res = inf.self_influence()
    want = np.einsum("np,pq,nq->n", g_train, inv, g_train)[res.indices]
    np.testing.assert_allclose(res.values, want, rtol=1e-6, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_a_keras_model_object_and_the_cache(data, tmp_path, caplog):
    x, y, _ = TestArchive(data / "test.npz").read("a")
    model = keras.models.load_model(data / "model.keras")
    cache = tmp_path / "cache"
    first = influence.Influence(model, train=data / "train.npz", solver="ekfac", preprocess="unit", cache=cache,
                                progress=False).fit()
    assert (cache / "ekfac.npz").is_file()
    caplog.set_level(logging.INFO)
    again = influence.Influence(model, train=data / "train.npz", solver="ekfac", preprocess="unit", cache=cache,
                                progress=False)
    np.testing.assert_array_equal(again.scores(x, y), first.scores(x, y))
    assert "curvature cache: loaded" in caplog.text


def test_mistakes_are_one_line_errors_naming_the_setting(data):
    train = data / "train.npz"
    model = str(data / "model.keras")
    with pytest.raises(UserError, match=r"takes no option iters; it takes: .*ekfac_max_block"):
        influence.Influence(model, train=train, solver="ekfac", preprocess="unit", iters=3)
    with pytest.raises(UserError, match="^solver: must be one of"):
        influence.Influence(model, train=train, solver="newton", preprocess="unit")
    with pytest.raises(UserError, match="^hessian: must be one of"):
        influence.Influence(model, train=train, solver="cg", hessian="fisher", preprocess="unit")
    inf = influence.Influence(model, train=train, solver="exact", preprocess="unit", progress=False)
    x, y, _ = TestArchive(data / "test.npz").read("a")
    with pytest.raises(UserError, match="uint8"):
        inf.scores(x.astype(np.float32), y)
    with pytest.raises(UserError, match=r"images must be \(T, 6, 6, 3\)"):
        inf.scores(x[:, :4], y)
    with pytest.raises(UserError, match="class indices 0..3"):
        inf.scores(x, y + 10)


@pytest.mark.slow
def test_the_api_takes_the_settings_with_keyword_overrides(data):
    """Influence(model, train, settings, **overrides): the settings' values, each keyword over them (parsed
    and checked by its field), the same bits as the keywords alone; a field of calculate.py's alone is refused."""
    from influence.settings import Damping, Settings

    train, model = data / "train.npz", str(data / "model.keras")
    x, y, _ = TestArchive(data / "test.npz").read("a")
    settings = Settings(solver="cg", damping="0.3", preprocess="unit", cg_tol=1e-3, top=7)
    inf = influence.Influence(model, train, settings, solver="exact", damping=DAMPING, progress=False)
    assert inf.solver_name == "exact" and inf.settings.damping == Damping(DAMPING)
    assert inf.settings.cg_tol == 1e-3 and inf.settings.model == model and settings.solver == "cg"
    alone = influence.Influence(model, train, solver="exact", damping=DAMPING, preprocess="unit", progress=False)
    assert np.array_equal(inf.scores(x, y), alone.scores(x, y))
    with pytest.raises(UserError, match="^memory_budget: must be > 0"):
        influence.Influence(model, train, settings, memory_budget=0)
    with pytest.raises(UserError, match="takes no option top"):
        influence.Influence(model, train, settings, top=3)


def test_both_faces_refuse_a_wrong_training_set_with_the_same_error(data, tmp_path):
    """A training label the model has no output for, or training images of another size or channel count:
    the API and calculate.py run the one check (models.check_training_set) before any work and raise the same
    SettingError, one line naming the face's setting (train; calculate.py's data, shown as --data), the same
    message but for how to resize; a negative label likewise. The API's test images and labels name theirs."""
    x, y = TrainArchive(data / "train.npz").take(np.arange(24))
    y = y.astype(np.int64)
    top = int(y.max())

    def model(name, shape, classes):
        path = tmp_path / f"{name}.keras"
        keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                          keras.layers.Dense(classes, activation="softmax")]).save(path)
        return path

    cases = [(model("few", (6, 6, 3), top), rf"training label {top} does not exist in a model with {top} outputs "
                                            rf"\(0..{top - 1}\)$", "", ""),
             (model("small", (5, 5, 3), 4), r"the training images are 6x6x3 but the model takes 5x5x3: ",
              "resize them to 5x5$", "run prepare_data.py again with --size 5 5$"),
             (model("gray", (6, 6, 1), 4), r"the model takes 1-channel images but the training images are 3-channel: "
                                           r"give a model with 3 input channels$", "", "")]
    for path, message, api_hint, calculate_hint in cases:
        with pytest.raises(SettingError) as api:
            influence.Influence(str(path), train=(x, y), solver="exact", preprocess="unit", progress=False)
        with pytest.raises(SettingError) as calc:
            calculate(calc_settings(data, tmp_path / "out", model=str(path)))
        assert api.value.setting == "train" and calc.value.setting == "data"
        assert re.match("^train: " + message + api_hint, str(api.value)), str(api.value)
        assert re.match("^--data: " + message + calculate_hint, calc.value.for_flags({"data": "--data"}))
        assert "\n" not in str(api.value) + str(calc.value)
    model = str(data / "model.keras")
    with pytest.raises(SettingError, match=r"^train: training label -1 is negative; labels are class indices 0..3$"):
        influence.Influence(model, train=(x, np.where(np.arange(24) == 5, -1, y)), solver="exact", preprocess="unit",
                            progress=False)
    inf = influence.Influence(model, train=(x, y), solver="exact", preprocess="unit", progress=False)
    xt, yt, _ = TestArchive(data / "test.npz").read("a")
    for images, labels, message in ((xt[:, :5, :5], yt, r"^images must be \(T, 6, 6, 3\)"),
                                    (xt, np.full_like(yt, 4), r"^labels must be class indices 0..3, got 4..4")):
        with pytest.raises(UserError, match=message) as err:
            inf.scores(images, labels)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_calculate_is_a_client_of_the_api_and_a_backend_sees_every_pass(data, tmp_path):
    """Influence.from_settings gives calculate's numbers bit for bit (the job runs through it), and a
    backend object passed in does the training-set passes: the fit and the scoring."""
    import dataclasses

    from influence.backends import LocalBackend

    settings = calc_settings(data, tmp_path / "out", damping=DAMPING, solver="ekfac")
    calculate(settings)
    calls = []

    class Recording(LocalBackend):
        def fit(self, solver, archive, *, chunk, key):
            calls.append(("fit", solver.name, chunk, key["weights"]))
            super().fit(solver, archive, chunk=chunk, key=key)

        def score(self, scorer, archive, stacked, score_batch, *, key, work=None, desc="scoring"):
            calls.append(("score", int(stacked[0].shape[0]), score_batch))
            return super().score(scorer, archive, stacked, score_batch, key=key, work=work, desc=desc)

    inf = influence.Influence.from_settings(dataclasses.replace(settings, cache=str(tmp_path / "fresh")))
    assert inf.solver_name == "ekfac" and inf.cache == tmp_path / "fresh"
    inf.backend = Recording()
    x, y, _ = TestArchive(data / "test.npz").read("a")
    scores = inf.scores(x, y)
    assert [c[0] for c in calls] == ["fit", "score"] and calls[1][1:] == (3, settings.score_batch)
    assert not inf.loaded and (tmp_path / "fresh" / "ekfac.npz").is_file()
    for t in range(3):
        n = int(np.sum(y[:t + 1] == y[t]))
        np.testing.assert_array_equal(scores[t], np.load(tmp_path / "out" / "a" / str(int(y[t])) / f"{n}_scores.npy"))
    # the same settings with calculate's cache load the curvature calculate fitted
    again = influence.Influence.from_settings(settings).fit()
    assert again.loaded
