"""The ``store-vgg16`` section of ``benchmarks/run.py``: the gradient store against EK-FAC on VGG16 (issue 31).

VGG16 (``--weights none``: the costs do not depend on the weights), every parameter (138 M), ``--memory-budget 8``,
random 224x224 images: :data:`N_TRAIN` training images and two test folders of :data:`N_TEST` images each
(``--vgg16-images TRAIN,TEST``; ``--quick``: 8, 2). Three ``calculate.py`` runs side by side, one after the other:

1. ``--solver store --folders orig --cache DIR``: the K-FAC pass of its projection, the store's pass, ``C`` and
   its eigendecomposition, then every test image of ``orig``;
2. ``--solver store --folders new --cache DIR`` into another output folder: a new test folder on the same
   cache (``prepare_only_test.py``'s way of working): it must load ``C``, rewrite no store file, and cost its test
   gradients and products only;
3. ``--solver ekfac --folders orig``: the same images.

Rows: run 1's wall time over run 3's (the issue's target: at most 1/4); run 2's store files rewritten (target
0) and its wall time over run 1's; each further test image per training image in F (run 2's test-gradient and
scoring seconds over ``TEST x TRAIN``, against one VGG16 forward pass per image, compiled, batch 4, measured
here): the cache keeps ``C``'s damped inverse, so it is the test gradients, their projection and the products,
and at so few training images mostly the test gradients (the product with the store is D multiply-adds per
pair against F's 15.5 G); and each run's peak RSS.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from harness import REPO, random_vgg16_archives, record, run_script, say, timeit

#: training images and images per test folder (the issue's 64 x 40)
N_TRAIN, N_TEST = 64, 40
BUDGET_GB = 8
#: VGG16's batch for its F
F_BATCH = 4


def calculate(data, out, solver, folder, cache=None):
    """``calculate.py`` on VGG16 with every parameter -> (ok, wall seconds, peak RSS GiB, run.json or None)."""
    argv = [sys.executable, str(REPO / "calculate.py"), "--data", str(data), "--model", "vgg16", "--weights", "none",
            "--params", "all", "--solver", solver, "--memory-budget", str(BUDGET_GB), "--folders", folder,
            "-sf", "png", "--out", str(out)] + (["--cache", str(cache)] if cache else [])
    say(f"[store-vgg16] {' '.join(argv[2:])}")
    ok, wall, peak, _, _ = run_script("store-vgg16", f"calculate.py --solver {solver} --folders {folder}", argv)
    run = json.loads((Path(out) / "run.json").read_text()) if ok else None
    if run:
        say(f"  {wall / 60:.1f} min; timings: " + ", ".join(f"{k} {v:.1f}" for k, v in run["timings"].items()))
    return ok, wall, peak / 1024, run


def store_files(cache):
    """{name: (inode, mtime_ns, size)} of every store file under the cache."""
    return {str(p.relative_to(cache)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in Path(cache).glob("store-*/*") if p.name.startswith(("rows-", "scale-"))}


def vgg16_forward(repeats=3):
    """Seconds per image of VGG16's compiled forward pass (random weights, batch :data:`F_BATCH`)."""
    import keras
    import tensorflow as tf

    model = keras.applications.VGG16(weights=None)
    x = tf.constant(np.random.default_rng(0).random((F_BATCH, 224, 224, 3), np.float32))
    forward = tf.function(lambda batch: model(batch, training=False))
    return min(timeit(lambda: forward(x), repeats) for _ in range(2)) / F_BATCH


def bench_store_vgg16(args):
    """The store against EK-FAC on VGG16 (module docstring)."""
    n_train, n_test = (8, 2) if args.quick else (N_TRAIN, N_TEST)
    if getattr(args, "vgg16_images", None):
        n_train, n_test = (int(v) for v in args.vgg16_images.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_vgg16_"))
    try:
        random_vgg16_archives(tmp, n_train, n_test, folders=("orig", "new"))
        cache = tmp / "cache"
        ok1, store_wall, store_peak, first = calculate(tmp, tmp / "store", "store", "orig", cache)
        if not ok1:
            return
        before = store_files(cache)
        ok2, rerun_wall, rerun_peak, rerun = calculate(tmp, tmp / "store-new", "store", "new", cache)
        ok3, ekfac_wall, ekfac_peak, ekfac = calculate(tmp, tmp / "ekfac", "ekfac", "orig")
        what = f"{n_train} train x {n_test} test images"
        if ok3:
            record("store-vgg16", f"whole run, store / ekfac, {what}", store_wall / ekfac_wall, "", target=0.25,
                   op="<=", note=f"{store_wall / 60:.1f} min against {ekfac_wall / 60:.1f} min; store: curvature "
                                 f"{first['timings']['curvature_s']:.0f} s (K-FAC pass, store pass, C), D "
                                 f"{first['solver_info']['store_dim']}; ekfac: curvature "
                                 f"{ekfac['timings']['curvature_s']:.0f} s, inverse-HVPs "
                                 f"{ekfac['timings'].get('inverse_hvp_s', 0):.0f} s")
        if ok2:
            after = store_files(cache)
            rewritten = sum(before.get(k) != v for k, v in after.items()) + len(set(before) - set(after))
            record("store-vgg16", "new test folder: store files rewritten", float(rewritten), "", target=0, op="<=",
                   note=f"{len(after)} files; curvature loaded: {rerun['curvature']['loaded']}")
            record("store-vgg16", "new test folder: wall / the first store run's", rerun_wall / store_wall, "",
                   note=f"{rerun_wall / 60:.1f} min against {store_wall / 60:.1f} min: model load, {n_test} test "
                        f"gradients (C and its damped inverse loaded), the products, writing")
            forward = vgg16_forward()
            per = (rerun["timings"]["test_gradients_s"] + rerun["timings"]["scoring_s"]) / (n_test * n_train)
            record("store-vgg16", "each further test image per training image / F", per / forward, "F",
                   target=1e-3, op="<=",
                   note=f"{per * 1e3:.1f} ms per pair: (test gradients + scoring) / ({n_test} x {n_train}), "
                        f"the damped inverse of C loaded; F = {forward * 1e3:.0f} ms per image (batch "
                        f"{F_BATCH}, compiled)")
        for name, peak, ok in (("store", store_peak, ok1), ("store, new test folder", rerun_peak, ok2),
                               ("ekfac", ekfac_peak, ok3)):
            if ok:
                record("store-vgg16", f"peak RSS, {name}", peak, "GiB",
                       note=f"--memory-budget {BUDGET_GB} plus the model's own footprint")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
