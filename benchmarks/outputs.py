"""The ``outputs`` section of ``benchmarks/run.py``: what writing a test image's files costs, against
scoring it, before and after the figure work, on the same machine in one run.

* per output kind (harmful and useful strips, summary figure, the numbers' files, the report's
  thumbnails), milliseconds per test image, written in one process one after another, on the demo's
  training archive (:func:`kind_times`; the same script runs against a checkout of the baseline commit);
* whole runs of calculate.py: the demo's own command (``make demo``) and an MLP of about 37 000
  parameters on 1 000 training images with ``--solver ekfac`` and 40 test images: writing's share of
  the run (run.json ``writing_s`` / ``total_s``), writing against scoring per test image, peak RSS.

The baseline is ``git archive`` of :data:`BASELINE` (the commit before the raster figures) in a temporary
folder; without git, or without that commit, only the current rows are measured. The per-kind script
reads public names only (both trees have them).
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from demo_data import demo_data
from harness import record, run_measured, say

REPO = Path(__file__).resolve().parent.parent

#: the commit before the raster figures (issue 32): figures laid out once and drawn by matplotlib. The one
#: before that (figures drawn anew for every test image) was 1b60b6a; its rows stay in BENCHMARKS.md.
BASELINE = "ed76547"

#: test images of the per-kind timing (after one more to warm up)
KIND_IMAGES = 10

# Runs in a subprocess with the tree to measure first on sys.path: prints {kind: seconds per test image}.
KIND_SCRIPT = r'''
import json, sys, tempfile, time, pathlib
sys.path.insert(0, sys.argv[1])
import numpy as np
from influence.catalogue import TrainCatalogue
from influence.data.archive_reader import TrainArchive
from influence.outputs.figure_book import FigureBook
from influence.outputs.html_report import RunReport
from influence.outputs.ranking import top_indices
from influence.outputs.report import TestImage, write_test_outputs
from influence.outputs.summary import rows_of, summarize
train = TrainArchive(sys.argv[2]); n_images = int(sys.argv[3])
cat = TrainCatalogue.of(train); N = len(cat); layers = ["conv1", "conv2", "logits"]
book = FigureBook()
out = pathlib.Path(tempfile.mkdtemp()); rng = np.random.default_rng(0)
page = RunReport(out, train, str, {}, "png")
times = {}
def timed(kind, fn, count):
    t0 = time.perf_counter(); fn()
    if count:
        times[kind] = times.get(kind, 0.0) + time.perf_counter() - t0
for n in range(n_images + 1):
    count = n > 0                              # the first test image warms up
    shares = rng.normal(size=(N, len(layers))); scores = shares.sum(1)
    h, u = top_indices(scores, 5)
    images = dict(zip(h.tolist() + u.tolist(), train.take(np.concatenate([h, u]))[0]))
    test = {"image": images[int(h[0])], "label": 3, "pred": 5, "conf": 0.9, "file": "orig/3/0799.png",
            "class_name": str}
    for kind, idx in (("harmful", h), ("useful", u)):
        panels = [{"image": images[i], "rank": r, "score": float(scores[i]), "class": str(cat.labels[i]),
                   "file": str(cat.files[i])} for r, i in enumerate(idx.tolist(), 1)]
        timed(f"{kind} strip", lambda: book.strip(kind, len(panels)).render(test, panels, out / f"{kind}_{n}.png",
                                                                            "png"), count)
    s = summarize(scores, shares, cat.labels, layers, keep_classes=[3, 5])
    timed("summary figure", lambda: book.summary(rows_of(s), cat, layers).render(s, test, out / f"{n}_summary.png",
                                                                                 "png"), count)
    test_image = TestImage(test["image"], 3, 5, 0.9, "0799.png")
    timed("numbers (CSVs, score dicts)", lambda: write_test_outputs(
        out, n, scores=scores, shares=shares, layer_names=layers, catalogue=cat, test=test_image,
        fetch_image=images.__getitem__, fmt="png", figures=False), count)
    rows = [(int(i), float(scores[i])) for i in h], [(int(i), float(scores[i])) for i in u]
    timed("report (thumbnails, index.html)", lambda: (page.add("orig", 3, n + 1, test_image, *rows), page.write()),
          count)
print(json.dumps({k: v / n_images for k, v in times.items()}))
'''


def kind_times(tree, train_archive, images=KIND_IMAGES):
    """{output kind: seconds per test image} of the code in ``tree`` (a checkout), one process."""
    done = subprocess.run([sys.executable, "-c", KIND_SCRIPT, str(tree), str(train_archive), str(images)],
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if done.returncode != 0:
        raise RuntimeError(f"per-kind timing in {tree} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(tmp, say):
    """The files of :data:`BASELINE` under ``tmp`` (``git archive``; removed by :func:`drop_tree`), or None."""
    where = Path(tmp) / "baseline"
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", BASELINE], capture_output=True)
    done = (subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, capture_output=True)
            if archive.returncode == 0 else archive)
    if done.returncode != 0:
        say(f"  no baseline rows: git archive of {BASELINE} failed ({done.stderr.decode(errors='replace')[-200:]})")
        shutil.rmtree(where, ignore_errors=True)
        return None
    return where


def drop_tree(where):
    if where is not None:
        shutil.rmtree(where, ignore_errors=True)


def build_mlp_data(root, n_train=1000, per_class=4, epochs=20):
    """The MLP case under ``root``: the demo's digits (``n_train`` training images, ``per_class`` test images
    per class in each test folder), archives, and a trained Flatten -> Dense(12, relu) -> Dense(10) model
    (37 006 parameters) saved as ``root/model.keras``."""
    import keras

    from influence.experiments import demo

    data = demo.write_folders(root, n_train=n_train, per_class=per_class)
    x, y = data["train"][:2]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((demo.SIZE, demo.SIZE, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(12, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x.astype("float32") / 255.0, y, epochs=epochs, batch_size=64, verbose=0)
    model.save(root / "model.keras")
    argv, _, _ = demo.command(demo.COMMANDS[0], str(root))
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"prepare_data.py failed building {root}:\n{done.stderr[-2000:]}")
    return root


def bench_outputs(args):
    """Writing a test image's files against scoring it, before (:data:`BASELINE`) and now:
    per output kind in one process, and whole calculate.py runs (the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_outputs_"))
    base = None
    try:
        demo_root = demo_data(tmp)
        base = baseline_tree(tmp, say)
        trees = ([("before", base)] if base else []) + [("after", REPO)]
        say(f"[outputs] per output kind, {KIND_IMAGES} test images of the demo's training archive, png")
        kinds = {label: kind_times(tree, demo_root / "train.npz") for label, tree in trees}
        for kind in kinds["after"]:
            before = kinds.get("before", {}).get(kind)
            record("outputs", f"{kind}: ms per test image", kinds["after"][kind] * 1e3, "ms",
                   note="" if before is None else f"before {before * 1e3:.1f} ms "
                                                 f"({before / kinds['after'][kind]:.1f}x)")
        totals = {label: sum(k.values()) for label, k in kinds.items()}
        mlp = build_mlp_data(tmp / "mlp")
        cases = {"make demo": ["--data", str(demo_root), "--model", str(demo_root / "model.keras"), "--preprocess",
                               "unit", "--self-influence", "-sf", "png"],
                 "MLP, 1 000 images, ekfac, 40 test images": ["--data", str(mlp), "--model", str(mlp / "model.keras"),
                                                              "--preprocess", "unit", "--solver", "ekfac", "-sf",
                                                              "png", "--folders", "orig"]}
        peaks = {}
        for case, case_args in cases.items():
            for label, tree in trees:
                out = tmp / f"out_{label}_{len(peaks)}"
                say(f"  calculate.py ({label}): {case}")
                code, wall, peak, _, tail = run_measured([sys.executable, str(Path(tree) / "calculate.py"),
                                                          *case_args, "--out", str(out)])
                if code != 0:
                    raise RuntimeError(f"calculate.py ({label}, {case}) exited {code}:\n{tail}")
                run = json.loads((out / "run.json").read_text())
                tm, done = run["timings"], run["counts"]["test_images_done"]
                scoring = sum(tm.get(k, 0.0) for k in ("test_gradients_s", "inverse_hvp_s", "scoring_s"))
                say("    run.json timings: " + ", ".join(f"{k} {v:.2f}" for k, v in tm.items()))
                target = dict(target=25, op="<=") if label == "after" else {}
                record("outputs", f"{case} ({label}): writing, % of the run", 100 * tm["writing_s"] / tm["total_s"],
                       "%", note=f"writing {tm['writing_s']:.1f} s of {tm['total_s']:.1f} s, {done} test images",
                       **target)
                record("outputs", f"{case} ({label}): writing / scoring per test image",
                       tm["writing_s"] / max(scoring, 1e-9), "x",
                       note=f"scoring (gradients, inverse-HVPs, scores) {1e3 * scoring / done:.0f} ms per test image; "
                            f"one process writes {1e3 * totals[label]:.0f} ms per test image (per-kind rows)",
                       **(dict(target=4, op="<=") if label == "after" else {}))
                peaks[(case, label)] = peak
            if ("before" in kinds) and (case, "before") in peaks:
                record("outputs", f"{case}: peak RSS after / before", peaks[(case, "after")] / peaks[(case, "before")],
                       "x", target=1.05, op="<=",
                       note=f"{peaks[(case, 'before')]:.0f} -> {peaks[(case, 'after')]:.0f} MiB (main process)")
    finally:
        drop_tree(base)
        shutil.rmtree(tmp, ignore_errors=True)
