"""calculate.py end to end: real scripts on a tiny image tree, outputs, resume, and every error."""
import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, random_tree
from engine_helpers import dense_hessian, per_example_gradients

keras = pytest.importorskip("keras")

SIZE = 6
TRAIN_CLASSES = ["0", "1", "2", "3"]


def _model(path, outputs=4, size=SIZE):
    keras.utils.set_random_seed(0)
    reg = keras.regularizers.L2(1e-3)
    m = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Conv2D(2, 3, activation="relu", kernel_regularizer=reg, name="conv"),
        keras.layers.Flatten(name="flat"),
        keras.layers.Dense(outputs, activation="softmax", kernel_regularizer=reg, name="dense"),
    ])
    m.save(path)
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A prepared data folder (train 4 classes x 6 images, test folders orig and wb) and a model."""
    root = tmp_path_factory.mktemp("calc")
    random_tree(str(root / "train"), TRAIN_CLASSES, 6, size=(SIZE, SIZE), seed=1)
    random_tree(str(root / "orig"), ["0", "2"], 2, size=(SIZE, SIZE), seed=2)
    random_tree(str(root / "wb"), ["1"], 1, size=(SIZE, SIZE), seed=3)
    r = subprocess.run([sys.executable, os.path.join(REPO, "prepare_data.py"), "-tr", "train", "-ts", "orig", "wb",
                        "-bs", "10", "--size", str(SIZE), "--out", "data"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _model(root / "model.keras")
    return root


def calc_script(root, *args, timeout=300):
    """calculate.py as a real process (its start-up included) -> CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, "calculate.py"), "--data", "data",
                           "--model", "model.keras", "--preprocess", "unit", *map(str, args)],
                          cwd=root, capture_output=True, text=True, timeout=timeout)


def calc(root, *args):
    """calculate.py's entry point in-process (parser -> run_main -> job; TensorFlow's start-up paid once)
    -> CompletedProcess with the exit code and what it wrote on stderr."""
    from influence.calculate_cli import build_parser, job
    from influence.cli import main

    err = io.StringIO()
    with contextlib.chdir(root), contextlib.redirect_stderr(err):
        try:
            code = main(build_parser, job, ["--data", "data", "--model", "model.keras", "--preprocess", "unit",
                                            *map(str, args)])
        except SystemExit as exc:          # argparse's usage errors exit
            code = exc.code
    return subprocess.CompletedProcess([], code, "", err.getvalue())


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for f in fragments:
        assert f in last, last


EXACT = ("--solver", "exact", "--hessian", "full", "--damping", "0.1", "-sf", "png", "--top", "3")


@pytest.mark.slow
def test_end_to_end_outputs_and_numbers(project):
    r = calc_script(project, *EXACT, "--out", "out")
    assert r.returncode == 0, r.stderr
    out = project / "out"
    # console: per folder, per class, per test image with the paths written
    assert "== test folder orig" in r.stderr and "orig/2 [2]" in r.stderr and "wrote" in r.stderr
    assert (out / "orig" / "orig_preds.csv").exists() and (out / "wb" / "wb_preds.csv").exists()
    for folder, label, n in [("orig", 0, 1), ("orig", 0, 2), ("orig", 2, 2), ("wb", 1, 1)]:
        d = out / folder / str(label)
        for name in (f"harmful_{n}.png", f"useful_{n}.png", f"harmful_{n}.csv", f"useful_{n}.csv",
                     f"{n}.npy", f"{n}_scores.npy"):
            assert (d / name).exists(), d / name
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["settings"]["solver"] == "exact"
    assert run["counts"]["test_images_done"] == 5 and run["layers"] == ["conv", "dense"]
    assert {"tensorflow", "keras", "numpy"} <= set(run["versions"]) and run["timings"]["total_s"] > 0

    # the numbers: score = grad L_test . (H + λI)^-1 grad L_train, recomputed here with a dense Hessian
    from influence.data.archive_reader import TestArchive, TrainArchive
    from influence.model.derivatives import Derivatives
    from influence.model.models import load_classifier

    train = TrainArchive(project / "data" / "train.npz")
    x_tr, y_tr = train.take(np.arange(len(train)))
    x_te, y_te, files = TestArchive(project / "data" / "test.npz").read("orig")
    clf = load_classifier(str(project / "model.keras"), preprocess="unit")
    d = Derivatives(clf, train.image_shape)
    H = dense_hessian(d, x_tr, y_tr.astype(np.int64)).astype(np.float64)
    G_tr = per_example_gradients(d, x_tr, y_tr.astype(np.int64))
    i = int(np.nonzero(y_te == 2)[0][1])                      # the 2nd test image of class 2 -> n = 2
    g = per_example_gradients(d, x_te[i:i + 1], y_te[i:i + 1].astype(np.int64))[0]
    want = G_tr @ np.linalg.solve(H + 0.1 * np.eye(len(g)), g)
    got = np.load(out / "orig" / "2" / "2_scores.npy", allow_pickle=False)
    assert got.dtype == np.float32 and got.shape == (len(train),)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())

    # the original's dict: "{batch}_{index}" -> {layer: share, "total": score}, shares summing to the total
    table = np.load(out / "orig" / "2" / "2.npy", allow_pickle=True).item()
    assert len(table) == len(train)
    keys = [k for b in train.batches for k in train.keys(b)]
    for k, total in zip(keys, got):
        entry = table[k]
        assert set(entry) == {"conv", "dense", "total"}
        assert entry["conv"] + entry["dense"] == pytest.approx(entry["total"], rel=1e-4, abs=1e-6)
        assert entry["total"] == pytest.approx(float(total), rel=1e-6, abs=1e-7)
    # the CSVs: most negative first in harmful, most positive first in useful
    with open(out / "orig" / "2" / "harmful_2.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == [keys[j] for j in np.argsort(got, kind="stable")[:3]]
    with open(out / "orig" / "2" / "useful_2.csv") as fh:
        top = next(csv.DictReader(fh))
    assert float(top["score"]) == pytest.approx(float(got.max()), rel=1e-5)
    image, label, file = train.lookup(top["key"])
    assert label == int(top["label"]) and file == top["file"]


@pytest.mark.slow
def test_rerun_skips_finished_images_and_redoes_missing_ones(project):
    args = (*EXACT, "--out", "resume", "--folders", "orig")
    assert calc(project, *args).returncode == 0
    d = project / "resume" / "orig" / "2"
    keep = (d / "1_scores.npy").stat().st_mtime_ns
    os.remove(d / "useful_2.png")                       # as if the run had stopped inside image 2
    r = calc(project, *args)
    assert r.returncode == 0, r.stderr
    assert "(3 already done)" in r.stderr               # image 1 of class 2 (and class 0) skipped, image 2 redone
    assert (d / "useful_2.png").exists() and (d / "1_scores.npy").stat().st_mtime_ns == keep
    run = json.loads((project / "resume" / "run.json").read_text())
    assert run["counts"] == {"test_images_done": 1, "test_images_skipped": 3}
    r = calc(project, *args, "--overwrite")
    assert r.returncode == 0 and (d / "1_scores.npy").stat().st_mtime_ns != keep
    # other math settings in the same --out folder are refused
    one_line_error(calc(project, "--solver", "exact", "--damping", "0.5", "-sf", "png", "--out", "resume",
                        "--folders", "orig"), "other settings", "damping 0.1 -> 0.5")


@pytest.mark.slow
def test_no_figures_writes_the_numbers_and_a_later_run_adds_the_figures(project):
    args = (*EXACT, "--out", "numbers", "--folders", "orig")
    r = calc(project, *args, "--no-figures")
    assert r.returncode == 0, r.stderr
    out = project / "numbers"
    d = out / "orig" / "2"
    assert sorted(p.name for p in d.iterdir()) == ["1.npy", "1_layerwise.csv", "1_scores.npy", "2.npy",
                                                   "2_layerwise.csv", "2_scores.npy", "harmful_1.csv", "harmful_2.csv",
                                                   "useful_1.csv", "useful_2.csv"]
    page = (out / "index.html").read_text()
    assert "harmful_2.csv" in page and "harmful_2.png" not in page
    assert json.loads((out / "run.json").read_text())["counts"]["test_images_done"] == 4
    scores = np.load(d / "2_scores.npy")
    r = calc(project, *args)                    # figures are not a math setting: the same folder takes them
    assert r.returncode == 0, r.stderr
    assert (d / "harmful_2.png").is_file() and (d / "2_summary.png").is_file()
    assert "harmful_2.png" in (out / "index.html").read_text()
    np.testing.assert_array_equal(np.load(d / "2_scores.npy"), scores)


@pytest.mark.slow
def test_killed_run_resumes(project):
    cmd = [sys.executable, os.path.join(REPO, "calculate.py"), "--data", "data", "--model", "model.keras",
           "--preprocess", "unit", *EXACT, "--out", "killed"]
    proc = subprocess.Popen(cmd, cwd=project, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stderr:
        if "wrote" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0
    # a kill leaves at most temporary files (never a half-written file under its real name); the
    # output folder's lock file is a dot-file too, and stays
    leftovers = [p for p in (project / "killed").rglob("*") if p.name.startswith(".") and p.name != ".lock"]
    assert all(".tmp" in p.name for p in leftovers), leftovers
    r = calc(project, *EXACT, "--out", "killed")
    assert r.returncode == 0, r.stderr
    run = json.loads((project / "killed" / "run.json").read_text())
    assert run["counts"]["test_images_skipped"] >= 1
    assert run["counts"]["test_images_done"] + run["counts"]["test_images_skipped"] == 5


@pytest.mark.slow
def test_lissa_and_cg_run_through_the_script(project):
    # LiSSA needs H + λI positive definite: the last layer of a network is convex (plus L2)
    r = calc(project, "-i", "50", "-b", "8", "--damping", "0.1", "-sf", "png", "--out", "lissa", "--folders", "wb",
             "--params", "dense")
    assert r.returncode == 0, r.stderr
    assert "LiSSA scale: auto = 1.1 x" in r.stderr
    info = json.loads((project / "lissa" / "run.json").read_text())["solver_info"]
    assert info["scale"] == pytest.approx(1.1 * max(info["lambda_max"], info["lambda_max_minibatch"]))
    r = calc(project, "--solver", "cg", "--damping", "0.1", "-sf", "pdf", "--out", "cg", "--folders", "wb",
             "--params", "dense")
    assert r.returncode == 0, r.stderr
    table = np.load(project / "cg" / "wb" / "1" / "1.npy", allow_pickle=True).item()
    assert set(next(iter(table.values()))) == {"dense", "total"}
    assert (project / "cg" / "wb" / "1" / "harmful_1.pdf").read_bytes()[:4] == b"%PDF"


@pytest.mark.slow
def test_errors_through_the_script_are_one_line_with_exit_code_2(project, tmp_path):
    one_line_error(subprocess.run([sys.executable, os.path.join(REPO, "calculate.py"), "--data", str(tmp_path)],
                                  capture_output=True, text=True), "run prepare_data.py first")
    one_line_error(calc(project, "--bogus"), "unrecognized arguments")
    one_line_error(calc(project, "--params", "nope", "--out", str(tmp_path / "o")), "no layer with weights named nope")


@pytest.mark.parametrize("args, fragments", [
    (("--solver", "exact", "--max-exact-params", "5"), ["above the limit of 5"]),
    (("--params", "last:0"), ["last:N"]),
    (("--scale", "big"), ["--scale"]),
    (("--top", "0"), ["--top"]),
    (("--folders", "styled"), ["no test folder styled", "orig, wb"]),
    (("--solver", "lissa", "--scale", "1e-12", "-i", "300", "--folders", "wb"),     # beyond what restarts reach
     ["diverged", "after 4 restart(s)", "larger damping", "larger scale"]),
    (("--model", "nosuchnet"), ["--model: unknown 'nosuchnet'"]),
    (("--model", "missing.keras"), ["model file not found"]),
    (("--model", "m8.keras"), ["--data: the training images are 6x6x3", "--size 8 8"]),
    (("--model", "m2.keras"), ["label 3", "2 outputs"]),
])
def test_errors_are_one_line_with_exit_code_2(project, tmp_path, monkeypatch, capsys, args, fragments):
    """The same code path as the script (parser -> run_main -> job), in-process to save start-up time."""
    from influence.calculate_cli import build_parser, job
    from influence.cli import main

    if not (project / "m8.keras").exists():
        _model(project / "m8.keras", size=8)
        _model(project / "m2.keras", outputs=2)
    monkeypatch.chdir(project)
    code = main(build_parser, job, ["--data", "data", "--model", "model.keras", "--preprocess", "unit",
                                    "--out", str(tmp_path / "o"), *args])
    result = subprocess.CompletedProcess([], code, "", capsys.readouterr().err)
    one_line_error(result, *fragments)
    assert not list((tmp_path / "o").rglob("*_scores.npy"))


def test_missing_imagenet_weights_name_the_fix(monkeypatch):
    from influence.model import keras_models
    from influence.errors import UserError

    def offline(weights=None):
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(UserError, match=r"^weights: could not get .*give weights a file path.*model"):
        keras_models.load_keras_model("vgg16", "imagenet")
    with pytest.raises(UserError, match="not found"):
        keras_models.load_keras_model("vgg16", "/no/such/weights.h5")


@pytest.mark.slow
def test_vgg16_smoke_two_images(tmp_path):
    """Real VGG16 graph (random weights), 224x224, influence over the last layer only."""
    random_tree(str(tmp_path / "train"), ["n01440764", "n15075141"], 1, size=(224, 224), seed=5)
    random_tree(str(tmp_path / "orig"), ["0"], 1, size=(224, 224), seed=6)
    r = subprocess.run([sys.executable, os.path.join(REPO, "prepare_data.py"), "-tr", "train", "-ts", "orig",
                        "--out", "data"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "data" / "labels.json").read_text())["kind"] == "imagenet"
    r = subprocess.run([sys.executable, os.path.join(REPO, "calculate.py"), "--data", "data", "--weights", "none",
                        "--params", "last:1", "-i", "2", "-b", "2", "--scale", "100", "-sf", "png", "--top", "2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stderr
    table = np.load(tmp_path / "calc_output" / "orig" / "0" / "1.npy", allow_pickle=True).item()
    assert set(table) == {"0_0", "0_1"} and set(table["0_0"]) == {"predictions", "total"}
    with open(tmp_path / "calc_output" / "orig" / "orig_preds.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["class_name"] == "tench"
