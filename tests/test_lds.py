"""LDS panel (influence/experiments/lds.py): the pure functions against hand-computed values, and resume."""
import json

import numpy as np
import pytest

from influence.experiments import lds, lds_retrain


def test_subset_masks_half_and_prefix_stable():
    masks = lds.subset_masks(11, 5, seed=3)
    assert masks.shape == (5, 11) and masks.dtype == bool
    assert (masks.sum(axis=1) == 5).all()                      # n // 2 kept
    np.testing.assert_array_equal(lds.subset_masks(11, 3, seed=3), masks[:3])
    assert not np.array_equal(lds.subset_masks(11, 5, seed=4), masks)
    assert len({m.tobytes() for m in masks}) == 5              # distinct subsets


def test_predicted_changes_by_hand():
    scores = np.array([[1.0, 2.0, 3.0, 4.0],
                       [-4.0, 0.0, 8.0, 0.0]])                 # (T=2, N=4)
    masks = np.array([[True, True, False, False],              # removes 2, 3
                      [False, True, True, True]])              # removes 0
    got = lds.predicted_changes(scores, masks)
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got, [[(3 + 4) / 4, (8 + 0) / 4],
                                     [1 / 4, -4 / 4]])


def test_lds_perfect_reversed_and_nan():
    actual = np.array([[0.1, 5.0], [0.3, 4.0], [0.2, 3.0], [0.9, 1.0]])
    np.testing.assert_allclose(lds.lds(actual, actual), [1.0, 1.0])
    np.testing.assert_allclose(lds.lds(-actual, actual), [-1.0, -1.0])
    np.testing.assert_allclose(lds.lds(actual ** 3 + 7, actual), [1.0, 1.0])   # ranks only
    flat = np.column_stack([np.ones(4), actual[:, 1]])
    got = lds.lds(flat, actual)                                # a constant column has no ranks
    assert np.isnan(got[0]) and got[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lds.lds(actual[:, :1], actual)


def test_lds_known_value():
    # ranks of predicted 1 2 3 4, actual 1 3 2 4: Spearman = 1 - 6*2/(4*15) = 0.8
    pred = np.array([[1.0], [2.0], [3.0], [4.0]])
    act = np.array([[10.0], [30.0], [20.0], [40.0]])
    assert lds.lds(pred, act)[0] == pytest.approx(0.8)


def test_noise_ceiling():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 3))
    np.testing.assert_allclose(lds.noise_ceiling(np.stack([a, a])), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(lds.noise_ceiling(np.stack([a, -a])), [-1.0, -1.0, -1.0])
    # three seeds: the mean of the three pairs (a, a) = 1, (a, -a) = -1, (a, -a) = -1
    np.testing.assert_allclose(lds.noise_ceiling(np.stack([a, a, -a])), [-1 / 3] * 3)
    with pytest.raises(ValueError):
        lds.noise_ceiling(a[None])


def test_right_sign_rate_by_hand():
    # 4 subsets of N=4 images; the actual loss of the one test image is 1 + (image 0 kept) - (image 3 kept)
    masks = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=bool)
    actual = (1.0 + masks[:, 0] - masks[:, 3])[:, None]       # (M=4, T=1)
    # image 0 is harmful (keeping it raises the loss), image 3 useful
    right = np.array([[-5.0, 0.1, 0.2, 5.0]])
    wrong = -right
    assert lds.right_sign_rate(right, masks, actual, top=1) == (1.0, 1.0)
    assert lds.right_sign_rate(wrong, masks, actual, top=1) == (0.0, 0.0)
    # top-2: images 1 and 2 do not move the loss (equal means): neither lower nor higher -> wrong
    assert lds.right_sign_rate(right, masks, actual, top=2) == (0.5, 0.5)


def test_evaluate_row():
    rng = np.random.default_rng(1)
    n, m, t = 20, 400, 3
    masks = lds.subset_masks(n, m, 0)
    scores = 0.01 * rng.normal(size=(t, n))
    scores[:, :5], scores[:, 5:10] = -10.0 - scores[:, :5], 10.0 + scores[:, 5:10]   # clear top-5 lists
    actual = lds.predicted_changes(scores, masks) + 2.0      # a linear datamodel: LDS = 1
    row = lds.evaluate("x", "", scores, masks, actual, np.array([True, False, False]), 1.5)
    assert row.lds_mean == pytest.approx(1.0) and row.lds_wrong == pytest.approx(1.0)
    assert row.harmful_right == 1.0 and row.useful_right == 1.0


def _fake_trainer(calls):
    def fake(x, y, x_test, y_test, epochs, seed):
        calls.append((len(y), int(seed)))
        # deterministic in the subset and seed: the sum of the kept pixels' first value
        return np.full(len(y_test), float(x[:, 0, 0, 0].astype(np.int64).sum()) + 1000 * seed)
    return fake


def _retrain(path, subsets, seeds, **kw):
    n = 10
    x = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    y = np.arange(n) % 3
    args = dict(subsets=subsets, seeds=seeds, recipe={"epochs": 1}, train_ids=np.arange(n),
                test_keys=np.array(["orig/0/1", "orig/1/1"]), base_losses=np.zeros(2), base_preds=np.zeros(2, int))
    args.update(kw)
    return lds.retrain(path, x, y, np.zeros((2, 1, 1, 1), np.uint8), np.zeros(2, int), **args)


def test_retrain_resumes_and_extends(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lds_retrain, "train_and_evaluate", _fake_trainer(calls))
    path = tmp_path / "retrain.npz"
    first = _retrain(path, 3, [0, 1])
    assert len(calls) == 6 and first["trained"] == 6
    assert first["losses"].shape == (2, 3, 2) and np.isfinite(first["losses"]).all()
    assert all(n == 5 for n, _ in calls)                       # half of 10
    # reused: nothing trained again
    calls.clear()
    again = _retrain(path, 3, [0, 1])
    assert calls == [] and again["trained"] == 0
    np.testing.assert_array_equal(again["losses"], first["losses"])
    # more subsets and a new seed: only the missing (seed, subset) runs
    more = _retrain(path, 5, [0, 1, 2])
    assert sorted(calls) == sorted([(5, 0), (5, 1), (5, 0), (5, 1)] + [(5, 2)] * 5)
    np.testing.assert_array_equal(more["losses"][:2, :3], first["losses"])
    # fewer asked: a slice of what is there, the file keeps everything
    calls.clear()
    fewer = _retrain(path, 2, [1])
    assert calls == [] and fewer["losses"].shape == (1, 2, 2)
    np.testing.assert_array_equal(fewer["losses"][0], more["losses"][1, :2])
    assert lds.load_cache(path)["losses"].shape == (3, 5, 2)
    assert not list(tmp_path.glob(".*tmp*"))                  # atomic writes leave no temporaries


def test_retrain_resumes_a_partial_cache(tmp_path, monkeypatch):
    """k of M runs done (an interrupted run): only the missing ones are trained."""
    calls = []
    monkeypatch.setattr(lds_retrain, "train_and_evaluate", _fake_trainer(calls))
    path = tmp_path / "retrain.npz"
    full = _retrain(path, 4, [0, 1])
    cache = lds.load_cache(path)
    done = cache["done"].copy()
    done[1, 2:] = False                                        # seed 1 of subsets 2, 3 "not yet"
    losses = cache["losses"].copy()
    losses[~done] = np.nan
    lds.save_cache(path, cache["masks"], cache["seeds"], losses, done, json.dumps(cache["meta"], sort_keys=True),
                   cache["base_losses"], cache["base_preds"])
    calls.clear()
    resumed = _retrain(path, 4, [0, 1])
    assert calls == [(5, 1), (5, 1)] and resumed["trained"] == 2
    np.testing.assert_array_equal(resumed["losses"], full["losses"])


def test_retrain_refuses_another_recipe(tmp_path, monkeypatch):
    from influence.errors import UserError

    monkeypatch.setattr(lds_retrain, "train_and_evaluate", _fake_trainer([]))
    path = tmp_path / "retrain.npz"
    _retrain(path, 2, [0, 1])
    with pytest.raises(UserError, match="another recipe"):
        _retrain(path, 2, [0, 1], recipe={"epochs": 2})


def test_validate_cli_calls_the_lds_panel(monkeypatch, tmp_path):
    from influence.experiments import validate_cli as validate

    seen = {}

    def fake_run(**kw):
        seen.update(kw)
        return lds.LdsResult("lds", [], 0.5, float("nan"), kw["subsets"], [0, 1], 10, ["orig/0/1"], 0, 0.0, 0,
                             markdown="| table |")

    monkeypatch.setattr(lds, "run", fake_run)
    args = validate.build_parser().parse_args(["--panels", "lds", "--lds-subsets", "8", "--lds-seeds", "3",
                                               "--lds-cache", str(tmp_path), "--lds-folders", "orig,noisy",
                                               "--out", str(tmp_path / "v.png")])
    results = validate.validate(args)
    assert [r.name for r in results] == ["lds"] and results[0].ok
    assert seen["subsets"] == 8 and seen["seeds"] == 3 and seen["cache"] == str(tmp_path)
    assert seen["folders"] == ["orig", "noisy"] and seen["out"] == tmp_path and not seen["quick"]
    assert seen["model"] == "demo" and seen["dense"]
    validate.validate(validate.build_parser().parse_args(["--panels", "lds", "--lds-model", "bn"]))
    assert seen["model"] == "bn"
    quick = validate.build_parser().parse_args(["--panels", "lds", "--quick"])
    validate.validate(quick)
    assert seen["subsets"] == 6 and seen["cache"] == "lds_cache/quick" and seen["quick"]


def test_table_and_figure(tmp_path):
    rows = [lds.LdsRow("ekfac", "--solver ekfac", np.array([0.2, 0.4]), 0.3, 0.4, 0.6, 0.7, 30.0, 12.0),
            lds.LdsRow(lds.RANDOM, "standard normal", np.array([0.0, 0.1]), 0.05, float("nan"), 0.5, 0.5, 0.0, 0.0)]
    result = lds.LdsResult("lds", rows, 0.5, 0.45, 8, [0, 1], 20, ["orig/0/1", "orig/1/1"], 1, 12.0, 16)
    table = lds.markdown(result)
    assert "| ekfac | --solver ekfac | 0.300 | 0.400 | 0.600 | 0.700 | 12.0 | 30.0 |" in table
    assert "| random | standard normal | 0.050 | – |" in table
    assert "| noise ceiling (seed vs seed) | | 0.500 | 0.450 |" in table and "8 random half-subsets" in table
    lds.plot(result, tmp_path / "lds.png")
    assert (tmp_path / "lds.png").stat().st_size > 1000
    data = lds.to_json(result)
    assert data["rows"][1]["lds_wrong"] is None and data["rows"][0]["lds"] == [0.2, 0.4]
    json.dumps(data)


def test_failed_solver_row(tmp_path):
    nan = float("nan")
    rows = [lds.LdsRow("lissa", "--solver lissa (FAILED at λ = 0.01: diverged)", np.array([nan]), nan, nan, nan, nan,
                       nan, nan)]
    result = lds.LdsResult("lds", rows, 0.5, nan, 8, [0, 1], 20, ["orig/0/1"], 0, 1.0, 0)
    assert "| lissa | --solver lissa (FAILED at λ = 0.01: diverged) | – | – | – | – | – | – |" in lds.markdown(result)
    lds.plot(result, tmp_path / "lds.png")


def test_score_raising_damping(monkeypatch):
    from influence.errors import UserError

    tried = []

    def fake(data, out, options, folders, keys, model=None):
        tried.append(list(options))
        damping = float(options[options.index("--damping") + 1].rstrip("x")) if "--damping" in options else 0.01
        if damping < 1:
            raise UserError("cg met negative curvature: raise --damping")
        return np.ones((1, 2)), 3.0, 2.0

    monkeypatch.setattr(lds, "score_with_calculate", fake)
    cg = ["--solver", "cg", "--damping", "0.01"]
    scores, seconds, compute, options = lds.score_raising_damping("d", "o", cg, ["orig"], ["orig/0/1"])
    assert tried[-1] == ["--solver", "cg", "--damping", "1"] and len(tried) == 3 and seconds == 3.0
    assert options[-1] == "(λ = 0.01, 0.1: negative curvature)"
    tried.clear()
    scores, seconds, _, options = lds.score_raising_damping("d", "o", cg, ["orig"], ["k"], tries=1)
    assert scores is None and np.isnan(seconds) and "FAILED at λ = 0.01, 0.1" in options[-1] and len(tried) == 2
    tried.clear()           # the default damping is relative (auto = 0.1x): its factor grows
    lds.score_raising_damping("d", "o", ["--solver", "cg"], ["orig"], ["k"], tries=1)
    assert tried == [["--solver", "cg"], ["--solver", "cg", "--damping", "1x"]]


def test_test_losses_of_a_softmax_model_are_those_of_its_logits():
    """The second panel model ends in a Softmax layer: its losses are taken from log-probabilities."""
    import keras

    keras.utils.set_random_seed(0)
    logits = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
    probs = keras.Sequential([logits, keras.layers.Softmax()])
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3)).astype(np.uint8)
    y = np.arange(5)
    want, want_pred = lds.test_losses(logits, x, y)
    got, got_pred = lds.test_losses(probs, x, y)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(got_pred, want_pred)


def test_panel_models_refuse_an_unknown_name(tmp_path):
    from influence.errors import SettingError

    with pytest.raises(SettingError, match="lds_model: must be one of demo, bn"):
        lds.prepare_model(tmp_path, "resnet")


def test_dense_reference_rows_one_per_damping(tmp_path):
    """The panel's yardstick rows: the dense GGN scores of a tiny model, one row per λ, named and timed."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(1e-4), name="logits")])
    model.save(tmp_path / "m.keras")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 4, 4, 3)).astype(np.uint8)
    data = lds.DemoData(tmp_path, x[:10], np.arange(10) % 3, np.arange(10), x[10:], np.array([0, 1]),
                        np.array(["orig/0/1", "orig/1/1"]), model_file=tmp_path / "m.keras")
    masks = lds.subset_masks(10, 6)
    rows = lds.dense_rows(data, np.array([0, 1]), masks, rng.normal(size=(6, 2)), np.array([False, True]),
                          dampings=(1e-3, 1e-1))
    assert [r.name for r in rows] == [lds.DENSE] * 2
    assert rows[0].options.startswith("λ = 0.001") and rows[1].options.startswith("λ = 0.1")
    assert all(np.isfinite(r.lds_mean) and r.seconds > 0 for r in rows)
