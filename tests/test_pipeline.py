"""The calculate job in-process: grouping, the curvature cache, resume safety and write failures."""
import errno
import json
import logging

import numpy as np
import pytest

from engine_helpers import calc_settings, random_data, write_project, write_test_archive, write_train_archive
from influence import engine
from influence.engine import calculate
from influence.errors import UserError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """data/ with train.npz (24 images), test.npz (folders a: 5 images, b: 3) and model.keras."""
    return write_project(tmp_path_factory.mktemp("pipeline"), 24, 10, {"a": 5, "b": 3})


def settings(data, out, **kw):
    return calc_settings(data, out, **{"damping": 0.05, **kw})


def with_other_training_set(data, folder, seed):
    """A copy of ``data`` (test.npz, model.keras) with another train.npz of the same size and layout."""
    folder.mkdir()
    for name in ("test.npz", "model.keras"):
        (folder / name).write_bytes((data / name).read_bytes())
    write_train_archive(folder / "train.npz", *random_data(24, seed=seed), batch=10)
    return folder


def scores_of(out):
    """{relative path: scores} of every ``<n>_scores.npy`` under ``out``."""
    return {str(p.relative_to(out)): np.load(p) for p in sorted(out.rglob("*_scores.npy"))}


@pytest.mark.slow
def test_lissa_numbers_do_not_depend_on_grouping_folders_or_limit(data, tmp_path):
    lissa = dict(solver="lissa", iter=30, bsize=4, params="dense", damping=0.3)
    calculate(settings(data, tmp_path / "full", **lissa))
    calculate(settings(data, tmp_path / "small", memory_budget=1e-6, folders=["b"], **lissa))
    calculate(settings(data, tmp_path / "limited", limit=1, **lissa))
    full, small, limited = (scores_of(tmp_path / d) for d in ("full", "small", "limited"))
    assert small and set(small) < set(full) and set(limited) < set(full)
    for part in (small, limited):
        for name, value in part.items():
            np.testing.assert_array_equal(value, full[name], err_msg=name)
    run = json.loads((tmp_path / "small" / "run.json").read_text())
    assert run["memory_plan"]["vectors"] == 1            # the tiny budget scored one image per group


@pytest.mark.slow
def test_curvature_cache_is_reused_and_invalidated(data, tmp_path, caplog):
    caplog.set_level(logging.INFO)

    def cached(data, out, **kw):
        """One test image per label of folder b: the cache is what is tested here, not the outputs."""
        return settings(data, out, folders=["b"], limit=1, **kw)

    cache = tmp_path / "cache"
    calculate(cached(data, tmp_path / "one", cache=str(cache)))
    assert (cache / "exact.npz").is_file()
    caplog.clear()
    calculate(cached(data, tmp_path / "two", cache=str(cache), damping=0.2))  # damping is applied after the cache
    assert "curvature cache: loaded" in caplog.text
    fresh = tmp_path / "fresh"
    calculate(cached(data, fresh, damping=0.2))
    for name, value in scores_of(fresh).items():
        np.testing.assert_allclose(scores_of(tmp_path / "two")[name], value, rtol=1e-6)

    caplog.clear()
    calculate(cached(data, tmp_path / "three", cache=str(cache), params="dense"))
    assert "curvature cache: params changed" in caplog.text and "refitting" in caplog.text

    # another training archive (same path, other contents) invalidates it
    other = with_other_training_set(data, tmp_path / "other", seed=9)
    same_model = str(data / "model.keras")
    calculate(cached(other, tmp_path / "four", cache=str(cache), model=same_model))
    caplog.clear()
    calculate(cached(other, tmp_path / "five", cache=str(cache), model=same_model))
    assert "curvature cache: loaded" in caplog.text
    caplog.clear()
    calculate(cached(data, tmp_path / "six", cache=str(cache)))
    assert "the training archive changed" in caplog.text

    # a corrupt cache file is refitted, never trusted
    (cache / "exact.npz").write_bytes(b"PK\x03\x04 garbage")
    caplog.clear()
    calculate(cached(data, tmp_path / "seven", cache=str(cache)))
    assert "unreadable" in caplog.text
    for name, value in scores_of(tmp_path / "seven").items():
        np.testing.assert_allclose(value, scores_of(tmp_path / "one")[name], rtol=1e-6)


@pytest.mark.slow
def test_resume_refuses_another_training_archive(data, tmp_path):
    calculate(settings(data, tmp_path / "out", folders=["b"]))
    other = with_other_training_set(data, tmp_path / "other", seed=11)
    same_model = str(data / "model.keras")
    with pytest.raises(UserError, match="another training archive"):
        calculate(settings(other, tmp_path / "out", folders=["b"], model=same_model))
    # a test folder whose images changed is refused too; a new folder is fine
    xb, yb = random_data(3, seed=12)
    xa, ya = random_data(5, seed=4)
    write_test_archive(other / "test.npz", {"a": (xa, ya), "b": (xb, yb)})
    write_train_archive(other / "train.npz", *random_data(24, seed=3), batch=10)
    with pytest.raises(UserError, match="test folder b computed on other test images"):
        calculate(settings(other, tmp_path / "out", folders=["b"], model=same_model))
    calculate(settings(other, tmp_path / "out", folders=["a"], model=same_model))


@pytest.mark.slow
def test_resumed_run_keeps_solver_facts(data, tmp_path):
    calculate(settings(data, tmp_path / "out", folders=["b"]))
    first = json.loads((tmp_path / "out" / "run.json").read_text())["solver_info"]
    calculate(settings(data, tmp_path / "out", folders=["b"]))
    again = json.loads((tmp_path / "out" / "run.json").read_text())
    assert first and again["solver_info"] == first and again["counts"]["test_images_done"] == 0


def test_negative_labels_are_refused_before_any_work(data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.keras").write_bytes((data / "model.keras").read_bytes())
    (bad / "train.npz").write_bytes((data / "train.npz").read_bytes())
    x, y = random_data(2, seed=1)
    write_test_archive(bad / "test.npz", {"a": (x, np.array([0, -1]))})
    with pytest.raises(UserError, match="label -1 is negative"):
        calculate(settings(bad, tmp_path / "out"))
    assert not (tmp_path / "out" / "a").exists()


@pytest.mark.parametrize("limit", [-1])
def test_negative_limit_is_an_error(data, tmp_path, limit):
    with pytest.raises(UserError, match="^limit: must be >= 0"):
        calculate(settings(data, tmp_path / "out", limit=limit))


@pytest.mark.slow
def test_disk_full_is_one_line_and_a_rerun_resumes(data, tmp_path, monkeypatch):
    real = engine.write_test_outputs
    calls = {"n": 0}

    def failing(folder_dir, n, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder_dir / f"{n}.npy"))
        return real(folder_dir, n, **kw)

    monkeypatch.setattr(engine, "write_test_outputs", failing)
    with pytest.raises(UserError, match="No space left on device.*a rerun resumes"):
        calculate(settings(data, tmp_path / "out", folders=["b"]))
    monkeypatch.setattr(engine, "write_test_outputs", real)
    assert not [p for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name]
    calculate(settings(data, tmp_path / "out", folders=["b"]))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["counts"] == {"test_images_done": 2, "test_images_skipped": 1}


@pytest.mark.slow
def test_grayscale_model_gets_a_channel_message(data, tmp_path):
    import keras

    gray = tmp_path / "gray"
    gray.mkdir()
    for name in ("train.npz", "test.npz"):
        (gray / name).write_bytes((data / name).read_bytes())
    keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                      keras.layers.Dense(4, activation="softmax")]).save(gray / "model.keras")
    with pytest.raises(UserError, match="^data: the model takes 1-channel images but the training images are 3-channel") as err:
        calculate(settings(gray, tmp_path / "out"))
    assert "--size" not in str(err.value)


@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused(data, tmp_path):
    from influence.locking import folder_lock

    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out, what="calculate.py"):
        with pytest.raises(UserError, match=r"another run \(pid \d+\) is writing into"):
            calculate(settings(data, out))
    calculate(settings(data, out, folders=["b"]))       # free again once the first run is over
    assert (out / "run.json").is_file()


@pytest.mark.slow
def test_self_influence_through_the_job(data, tmp_path, caplog, monkeypatch):
    import csv

    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)                   # a relative --out, as users type it
    calculate(settings(data, "out", self_influence=True, folders=["b"], params="dense", solver="ekfac"))
    with open(out / "self_influence.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    values = [float(r["self_influence"]) for r in rows]
    assert len(rows) == 24 and values == sorted(values, reverse=True)
    assert (out / "self_influence.png").is_file()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert 'src="self_influence.png"' in page and rows[0]["key"] in page
    caplog.clear()
    calculate(settings(data, out, self_influence=True, folders=["b"], params="dense", solver="ekfac"))
    assert "self_influence.csv exists" in caplog.text
    assert rows[0]["key"] in (out / "index.html").read_text(encoding="utf-8")
    with pytest.raises(UserError, match="^self_influence: with solver lissa.*solver ekfac"):
        calculate(settings(data, tmp_path / "lissa", self_influence=True, solver="lissa"))
    assert not (tmp_path / "lissa" / "a").exists()


@pytest.mark.slow
def test_resume_refuses_a_store_whose_auto_resolved_otherwise(data, tmp_path):
    """The store's dimension and structure come from auto (the budget, the model): a rerun into the same out that
    resolves them otherwise is refused, and a run.json from before store_curvature was recorded reads as the whole
    matrix (what the store inverted then)."""
    out = tmp_path / "out"
    calculate(settings(data, out, folders=["b"], solver="store"))
    path = out / "run.json"
    run = json.loads(path.read_text())
    info = run["solver_info"]
    assert info["store_curvature"] == "dense"            # no BatchNorm, krylov's basis fits: the whole matrix
    for fact, value, shown in (("store_curvature", "blocks", "store_curvature blocks -> dense"),
                               ("store_dim", info["store_dim"] + 1, f"store_dim {info['store_dim'] + 1} -> ")):
        path.write_text(json.dumps({**run, "solver_info": {**info, fact: value}}))
        with pytest.raises(UserError, match=f"holds results computed with other settings \\({shown}.*resolved from "
                                            f"auto"):
            calculate(settings(data, out, folders=["b"], solver="store"))
    path.write_text(json.dumps({**run, "solver_info": {k: v for k, v in info.items() if k != "store_curvature"}}))
    calculate(settings(data, out, folders=["b"], solver="store"))      # an old run: dense, as this one
