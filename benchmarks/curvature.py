#!/usr/bin/env python
"""Benchmarks of curvature reuse (issue 8): ``python benchmarks/curvature.py [--only SECTION]``.

Sections:

* ``scoring``  -- each further test image in one scoring pass, in F (demo CNN batch 256; VGG16
  ``--params all`` batch 4, random weights);
* ``fit``      -- the EK-FAC fit on the demo training set, in G per training image (both passes),
  and the LiSSA auto scale at 256 images / 1e-3 against 1 024 images / 1e-4;
* ``demo``     -- calculate.py end to end on the demo data: ``--solver ekfac`` (first run and a
  rerun that loads the curvature cache) against the demo's LiSSA settings and ``--solver cg``;
* ``vgg16``    -- calculate.py with VGG16 (``--weights none``), ``--params all``, 224², 64 training
  and 40 test images (``--vgg16-images``), ``--solver ekfac``, ``--memory-budget 8``: time, peak RSS,
  factor sizes. Memory rows (issue 16): the peak RSS by the end of each phase against
  ``--memory-budget`` plus the model's own footprint (the peak once the model is loaded,
  ``peak_rss_gib.load_model_s`` of run.json); a breach is a **FAIL**. The factors' size does not
  depend on the number of images, so ``--vgg16-images 8,3`` reaches the same fit peak in minutes.

Results are printed and written between the ``curvature`` markers of BENCHMARKS.md.
Timings are medians after a warm-up; they are never asserted in the tests.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from demo_data import demo_data  # noqa: E402
from harness import machine, random_vgg16_archives, run_measured, say, timeit  # noqa: E402

SECTIONS = ("scoring", "fit", "demo", "vgg16")
ROWS = []


def row(section, measure, value, unit, target="", note=""):
    ok = ""
    if target and value is not None:
        op, num = target.split()
        ok = "pass" if (value <= float(num) if op == "<=" else value >= float(num)) else "**FAIL**"
    ROWS.append((section, measure, value, unit, target, ok, note))
    shown = "n/a" if value is None else f"{value:.4g}"
    say(f"  {measure:<62} {shown:>10} {unit} {ok}" + (f"  ({note})" if note else ""))


# ----------------------------------------------------------------------------- scoring

def _scoring(section, clf, x, y, ts, repeats):
    import tensorflow as tf

    from influence.model.derivatives import Derivatives

    from influence.model.vectors import vec_stack
    from influence.scoring import Scorer

    d = Derivatives(clf, x.shape[1:])
    rng = np.random.default_rng(0)
    dtype = d.dtype.as_numpy_dtype
    vecs = [tuple(tf.constant(rng.standard_normal(tuple(v.shape)).astype(dtype) * 1e-3) for v in d.variables)
            for _ in range(max(ts))]
    f = timeit(lambda: d.losses(x, y), repeats)
    scorer = Scorer(d)
    times = {}
    for t in ts:
        stacked = vec_stack(vecs[:t])
        times[t] = timeit(lambda: scorer.shares(x, y, stacked), repeats)
    say(f"  routes: {scorer.routes}")
    row(section, "first test image (T=1, per-layer split) / F", times[1] / f, "F", "<= 3", f"F = {f * 1e3:.3g} ms")
    big = max(ts)
    extra = (times[big] - times[ts[1]]) / (big - ts[1])
    row(section, f"each further test image, (T={big} - T={ts[1]})/{big - ts[1]} / F", extra / f, "F", "<= 0.25",
        f"{extra * 1e3:.3g} ms per image")
    # check: the same numbers with the tangent route everywhere (T=1 compiled variant, one at a time)
    one = np.stack([scorer.shares(x, y, vec_stack([v]))[0] for v in vecs[:ts[1]]])
    many = scorer.shares(x, y, vec_stack(vecs[:ts[1]]))
    err = np.max(np.abs(one - many)) / max(np.max(np.abs(one)), 1e-30)
    say(f"  check: both routes agree to {err:.1e} (relative)")


def bench_scoring(args):
    from influence.experiments import demo
    from influence.data import digits
    from influence.model.models import Classifier, load_classifier, make_preprocess, select_params

    model = demo.build_model()
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"), "demo cnn")
    images, target = digits.load_digits()
    idx = np.random.default_rng(0).choice(len(target), 256, replace=False)
    x = digits.to_rgb(images[idx], demo.SIZE)
    y = target[idx].astype(np.int64)
    say("[scoring] demo CNN, batch 256")
    _scoring("scoring demo", clf, x, y, (1, 2, 32), repeats=3 if args.quick else 7)
    if args.quick:
        return
    say("[scoring] VGG16 --params all, batch 4, random weights")
    clf = load_classifier("vgg16", "none", "auto", "all")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    y = rng.integers(0, 1000, 4).astype(np.int64)
    _scoring("scoring vgg16", clf, x, y, (1, 2, 6), repeats=2)


# ----------------------------------------------------------------------------- fit

def bench_fit(args):
    from influence.data.archive_reader import TrainArchive
    from influence.curvature import make_solver
    from influence.curvature.iterative.lissa import estimate_lambda_max
    from influence.model.derivatives import Derivatives
    from influence.model.objective import TrainingObjective
    from influence.model.models import load_classifier

    tmp = Path(tempfile.mkdtemp(prefix="bench_fit_"))
    try:
        root = demo_data(tmp)
        train = TrainArchive(root / "train.npz")
        clf = load_classifier(str(root / "model.keras"), preprocess="unit")
        d = Derivatives(clf, train.image_shape)
        obj = TrainingObjective(d, train, chunk=256)
        x, y = train.take(np.arange(256))
        y = y.astype(np.int64)
        g = timeit(lambda: d.gradient(x, y), 5) / 256
        say(f"[fit] demo: {len(train)} training images, G = {g * 1e3:.3g} ms per image")
        for name in ("ekfac", "kfac"):
            solver = make_solver(name, obj, 0.01, progress=False)
            solver.fit()                       # traces the tf.functions
            t0 = time.perf_counter()
            solver = make_solver(name, obj, 0.01, progress=False)
            solver.fit()
            fit = time.perf_counter() - t0
            row("fit", f"{name} fit, all passes, per training image / G", fit / len(train) / g, "G",
                "<= 3" if name == "ekfac" else "", f"{fit:.2f} s for {len(train)} images")
        for sample, tol in ((1024, 1e-4), (256, 1e-3)):
            t0 = time.perf_counter()
            lam, it = estimate_lambda_max(obj, 0.01, sample=sample, iters=100, tol=tol)
            say(f"  λ_max on {sample} images, tol {tol:g}: {lam:.5g} ({it} iterations, {time.perf_counter() - t0:.1f} s)")
            if sample == 1024:
                ref = lam
        row("fit", "LiSSA auto scale: λ_max(256 img, 1e-3) / λ_max(1024 img, 1e-4)", lam / ref, "ratio", "",
            "the 1.1 margin covers a ratio down to 0.91")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- calculate.py end to end

def _calc(root, out, *extra):
    argv = [sys.executable, str(REPO / "calculate.py"), "--data", str(root), "--model", str(root / "model.keras"),
            "--preprocess", "unit", "-sf", "png", "--out", str(out), *extra]
    code, wall, peak, tree, tail = run_measured(argv)
    if code != 0:
        raise SystemExit(f"calculate.py failed ({code}):\n{tail}")
    run = json.loads((out / "run.json").read_text())
    return wall, peak, run


def bench_demo(args):
    tmp = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    try:
        root = demo_data(tmp)
        folders = ["--folders", "orig"] if args.quick else []
        say(f"[demo] calculate.py end to end on {root}")
        results = {}
        runs = [("ekfac", ["--solver", "ekfac"]), ("ekfac rerun (cache)", ["--solver", "ekfac"]),
                ("lissa -i 300 -b 32", ["-i", "300", "-b", "32"]), ("cg", ["--solver", "cg"])]
        for name, extra in runs:
            out = tmp / ("ekfac" if name.startswith("ekfac") else name.split()[0])
            if name.startswith("ekfac rerun"):
                shutil.rmtree(out / "orig", ignore_errors=True)
                for f in ("noisy", "inverted"):
                    shutil.rmtree(out / f, ignore_errors=True)
            sel = folders if name != "cg" else ["--folders", "orig"]
            wall, peak, run = _calc(root, out, *extra, *sel)
            tm = run["timings"]
            n = run["counts"]["test_images_done"]
            results[name] = dict(wall=wall, per_image=wall / n, n=n, tm=tm, peak=peak)
            say(f"  {name}: {n} test images, {wall:.1f} s wall, {peak:.0f} MiB peak; "
                + ", ".join(f"{k} {v:.1f}" for k, v in tm.items()))
        ek, lis, cg = results["ekfac"], results["lissa -i 300 -b 32"], results["cg"]
        compute = lambda r: sum(r["tm"].get(k, 0) for k in ("curvature_s", "inverse_hvp_s", "scoring_s",  # noqa: E731
                                                             "test_gradients_s"))
        row("demo", "lissa wall / ekfac wall (same test images)", lis["wall"] / ek["wall"], "x", ">= 10",
            f"{lis['wall']:.0f} s vs {ek['wall']:.0f} s for {ek['n']} images")
        row("demo", "lissa / ekfac, curvature + inverse-HVPs + scoring only", compute(lis) / compute(ek), "x", "",
            f"{compute(lis):.1f} s vs {compute(ek):.1f} s")
        row("demo", "cg / ekfac, wall per test image", cg["per_image"] / ek["per_image"], "x", ">= 20",
            f"cg {cg['per_image']:.1f} s/img on {cg['n']} images")
        row("demo", "cg / ekfac, compute per test image", (compute(cg) / cg["n"]) / (compute(ek) / ek["n"]), "x", "")
        rerun = results["ekfac rerun (cache)"]["tm"].get("curvature_s", 0)
        row("demo", "rerun curvature time / first run's", rerun / ek["tm"]["curvature_s"], "ratio", "<= 0.02",
            f"{rerun:.2f} s vs {ek['tm']['curvature_s']:.1f} s")
        row("demo", "writing (figures, CSVs, dicts) per test image", ek["tm"]["writing_s"] / ek["n"], "s", "",
            "background writer processes")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_vgg16(args):
    keep = args.workdir is not None
    tmp = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="bench_vgg_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        n_train, n_test = (16, 8) if args.quick else (64, 40)
        if args.vgg16_images:
            n_train, n_test = (int(v) for v in args.vgg16_images.split(","))
        budget = 8.0
        random_vgg16_archives(tmp, n_train, n_test)
        argv = [sys.executable, str(REPO / "calculate.py"), "--data", str(tmp), "--model", "vgg16", "--weights", "none",
                "--params", "all", "--solver", "ekfac", "--memory-budget", f"{budget:g}", "-sf", "png",
                "--out", str(tmp / "out")]
        say(f"[vgg16] {' '.join(argv[1:])}")
        code, wall, peak, tree, tail = run_measured(argv)
        if code != 0:
            say(f"  failed ({code}):\n{tail}")
            row("vgg16", "calculate.py VGG16 ekfac", None, "")
            return
        run = json.loads((tmp / "out" / "run.json").read_text())
        tm = run["timings"]
        say("  timings: " + ", ".join(f"{k} {v:.1f}" for k, v in tm.items()))
        say(f"  memory plan: {run['memory_plan']}")
        say("  peak RSS after each phase (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in run.get("peak_rss_gib", {}).items()))
        info = run["solver_info"]
        row("vgg16", f"wall, {n_train} train x {n_test} test images", wall, "s", "", f"{wall / 60:.1f} min")
        phases = run.get("peak_rss_gib", {})
        # the model's own footprint: TensorFlow, the runtime and the weights, before any budgeted work
        footprint = phases.get("load_model_s")
        limit = None if footprint is None else budget + footprint
        target = "" if limit is None else f"<= {limit:.3f}"
        note = "" if limit is None else f"--memory-budget {budget:g} + model footprint {footprint:.2f} GiB"
        row("vgg16", "peak RSS of calculate.py (polled VmHWM)", peak / 1024, "GiB", target, note)
        if footprint is not None:
            row("vgg16", "peak RSS - model footprint, vs --memory-budget", peak / 1024 - footprint, "GiB",
                f"<= {budget:g}", f"model footprint {footprint:.2f} GiB (peak after load_model_s)")
        row("vgg16", "EK-FAC factor memory (float64, while fitting)", info.get("factor_bytes", 0) / 2**30, "GiB")
        if info.get("fit_bytes"):
            row("vgg16", "EK-FAC fit's planned peak (factors, copies, workspaces)", info["fit_bytes"] / 2**30, "GiB",
                f"<= {budget:g}")
        for k in ("curvature_s", "inverse_hvp_s", "scoring_s", "writing_s"):
            row("vgg16", k, tm.get(k), "s")
        for k, v in phases.items():
            row("vgg16", f"peak RSS by the end of {k}", v, "GiB", "" if k == "load_model_s" else target)
        say("  layers: " + "; ".join(f"{k}: {v}" for k, v in info.get("layers", {}).items()))
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- report

def write_markdown(path, info, seconds, only):
    begin, end = "<!-- curvature:begin -->", "<!-- curvature:end -->"
    lines = [begin, "## Curvature reuse (issue 8)", "",
             f"`python benchmarks/curvature.py{''.join(' --only ' + o for o in only)}` on {info['date']}: "
             f"{info['cpu']}, {info['cores']} cores, TensorFlow {info['tf']}; {seconds:.0f} s in all.", "",
             "| section | measure | value | target | result | note |", "|---|---|---:|---|---|---|"]
    for section, measure, value, unit, target, ok, note in ROWS:
        shown = "n/a" if value is None else f"{value:.3g} {unit}"
        lines.append(f"| {section} | {measure} | {shown} | {target} | {ok} | {note} |")
    lines.append(end)
    block = "\n".join(lines)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    p.add_argument("--quick", action="store_true", help="smaller runs")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--vgg16-images", metavar="TRAIN,TEST",
                   help="vgg16: training and test images (default 64,40; --quick 16,8); the fit's peak does "
                        "not depend on them")
    p.add_argument("--workdir", help="vgg16: keep the archives and calculate.py's output (and its curvature "
                                     "cache) in this folder instead of a temporary one")
    args = p.parse_args(argv)
    from influence.cli import import_tensorflow_quietly

    import_tensorflow_quietly()
    info = machine()
    t0 = time.perf_counter()
    for name in args.only or SECTIONS:
        globals()[f"bench_{name}"](args)
    if not args.no_write:
        write_markdown(Path(args.out), info, time.perf_counter() - t0, args.only or [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
