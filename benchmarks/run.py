#!/usr/bin/env python
"""Speed and memory benchmarks of the influence engine (issue 5): ``python benchmarks/run.py``.

Everything runs in one process except the two scripts (``prepare_data.py``, ``calculate.py``),
which run as subprocesses so their peak memory can be read. Timings are medians of repeated
calls after a warm-up (the first call traces the ``tf.function``). Units:

  F  = one forward pass of the batch (``Derivatives.losses``, compiled)
  G  = one gradient step on the same batch (``Derivatives.gradient``: forward + backward)

Sections (``--only NAME``, repeatable): ``demo`` (the demo CNN, batch 256), ``vgg16`` (VGG16,
random weights, batch 4 at 224x224, ``--params last:3`` and ``all``), ``prepare``
(``prepare_data.py`` vs bare PIL, peak RSS at 1 000 and 10 000 images) and ``calculate``
(end to end on the demo data), ``memory`` (VGG16 with every parameter at the defaults, ``--memory-budget
8``: peak RSS per Fisher kind against the budget). The table is printed and written to ``BENCHMARKS.md`` (the
"Findings" part of that file is kept; use ``--no-write`` to leave the file alone).

A section that raises, or whose script exits non-zero, is a failure, not a missed target: it shows
as FAILED in the table with the last lines of its error, and the run exits 1 ("N section(s) failed:
..."). A measure off its target is "missed" and leaves the exit code at 0.

Timings are never asserted in the test suite: this script only measures and reports.
"""
import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SECTIONS = ("demo", "vgg16", "prepare", "calculate", "krylov", "truth", "outputs", "memory", "store")
RESULTS = []  # dicts: section, name, value, unit, target (str), ok (bool/None), note, failed (bool)
TAIL_LINES = 5  # lines of a failure's error shown under the table

# the model of the calculate section when demo/ is missing: the demo's own (`make demo`: 1 500 images,
# 30 epochs, about 20 s here). Trained for 3 epochs on 500 images it was far from a minimum
# (λ_min(H) = -3.5 against λ = 0.01) and LiSSA diverged at step 229 of -i 300; this one has
# λ_min(H) = -0.001 > -λ (Lanczos on the whole set) and LiSSA -i 300 -b 32 runs through.
DEMO_TRAIN, DEMO_EPOCHS = 1500, 30


# ----------------------------------------------------------------------------- helpers

def say(msg):
    print(msg, flush=True)


def record(section, name, value, unit, target=None, op=None, note=""):
    """Store one measured number; ``op`` is '<=' or '>=' against ``target`` (a number)."""
    ok = None
    if target is not None and op is not None and value is not None and np.isfinite(value):
        ok = value <= target if op == "<=" else value >= target
    RESULTS.append(dict(section=section, name=name, value=value, unit=unit,
                        target=None if target is None else f"{op} {target:g}", ok=ok, note=note, failed=False))
    shown = "n/a" if value is None else f"{value:.4g}"
    verdict = "" if ok is None else ("  PASS" if ok else "  MISSED")
    say(f"  {name:<58} {shown:>10} {unit}{verdict}" + (f"  ({note})" if note else ""))


def last_lines(text, n=TAIL_LINES):
    """The last ``n`` non-blank lines of ``text`` (progress bars' carriage returns count as line ends)."""
    lines = [line.rstrip() for line in re.split(r"[\r\n]+", text or "") if line.strip()]
    return lines[-n:]


def record_failure(section, name, error):
    """Store a failed script or section: ``error`` is its stderr or traceback (the tail is kept)."""
    tail = last_lines(error)
    RESULTS.append(dict(section=section, name=name, value=None, unit="", target=None, ok=None,
                        note=tail[-1] if tail else "", failed=True, tail=tail))
    say(f"  FAILED: {name}" + "".join(f"\n    {line}" for line in tail))


def failed_sections():
    """Names of the sections with a failure, in the order they ran."""
    return list(dict.fromkeys(r["section"] for r in RESULTS if r.get("failed")))


def run_section(name, fn, args):
    """Run one section; an exception is recorded as its failure (the other sections still run).
    Returns True when it ran through without a failure of its own."""
    import traceback

    try:
        fn(args)
    except Exception:  # noqa: BLE001 - any error of a section is reported, then the next runs
        record_failure(name, f"section {name} raised", traceback.format_exc())
    return name not in failed_sections()


def run_script(section, name, argv, cwd=None):
    """:func:`run_measured` of a script; a non-zero exit is recorded as a failure of ``section``.

    Returns (ok, wall seconds, main peak MiB, tree peak MiB, stderr tail)."""
    code, wall, peak, tree, tail = run_measured(argv, cwd=cwd)
    if code != 0:
        record_failure(section, f"{name} exited with code {code}", tail)
    return code == 0, wall, peak, tree, tail


def _sync(out):
    """Make sure a result is computed (CPU tf.functions return when done; touch it anyway)."""
    import tensorflow as tf

    first = tf.nest.flatten(out)[0]
    if hasattr(first, "numpy"):
        np.asarray(first.numpy()).ravel()[:1]
    return out


def timeit(fn, repeats, warmup=1, min_time=0.0):
    """Median seconds of ``fn()`` over ``repeats`` calls (at least until ``min_time`` spent)."""
    for _ in range(warmup):
        _sync(fn())
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50 * repeats):
        t0 = time.perf_counter()
        _sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine():
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import keras
    import tensorflow as tf

    return dict(cpu=cpu, cores=cores, tf=tf.__version__, keras=keras.__version__, numpy=np.__version__,
                python=platform.python_version(), date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))


# ----------------------------------------------------------------------------- engine benchmarks

class _Objective:
    """The little of ``TrainingObjective`` that ``LissaSolver.__init__`` and ``step`` touch."""

    def __init__(self, derivs, n, hessian="ggn"):
        self.d = derivs
        self.n = n
        self.dtype = derivs.dtype
        self.hessian = hessian        # calculate.py's default matrix, as its LiSSA steps take it
        self.vp_graph = derivs.hvp_graph if hessian == "full" else derivs.ggn_vp_graph


def original_scores(derivs, x, y, ihvp_flat_per_layer, slices):
    """The original tool's way: per image a gradient, flattened, dotted per layer with the
    inverse-HVP. Returns (N, L). (Uses the compiled gradient: kinder to it than the original's
    eager session calls.)"""
    n = len(y)
    out = np.empty((n, len(slices)))
    for i in range(n):
        g = derivs.gradient(x[i:i + 1], y[i:i + 1])
        for l, sl in enumerate(slices):
            flat = np.concatenate([np.asarray(t).ravel() for t in g[sl]])
            out[i, l] = float(np.dot(flat, ihvp_flat_per_layer[l]))
    return out


def engine_bench(section, clf, x, y, lissa_x, lissa_y, repeats, t_many=8, orig_images=None, min_time=0.0):
    """All the per-batch ratios of one model. ``x, y``: the batch; ``lissa_*``: the -b minibatch."""
    import tensorflow as tf

    from influence.model.derivatives import Derivatives

    from influence.model.vectors import vec_stack
    from influence.scoring import Scorer
    from influence.curvature.iterative.lissa import LissaSolver

    derivs = Derivatives(clf, x.shape[1:])
    n = len(y)
    rng = np.random.default_rng(0)
    like = derivs.variables
    dtype = derivs.dtype.as_numpy_dtype

    def rand_vec(scale=1e-3):
        return tuple(tf.constant(rng.standard_normal(tuple(v.shape)).astype(dtype) * scale) for v in like)

    say(f"[{section}] {clf.num_params:,} parameters in {len(clf.groups)} layer(s), batch {n} of "
        f"{'x'.join(map(str, x.shape[1:]))}")
    t0 = time.perf_counter()
    f = timeit(lambda: derivs.losses(x, y), repeats, min_time=min_time)
    g = timeit(lambda: derivs.gradient(x, y), repeats, min_time=min_time)
    record(section, "F: forward pass of the batch (losses)", f * 1e3, "ms", note=f"{f / n * 1e3:.3g} ms/img")
    record(section, "G: gradient step on the batch", g * 1e3, "ms", note=f"G/F = {g / f:.2f}")

    v = rand_vec()
    one, zero = tf.constant(1.0 / n, derivs.dtype), tf.constant(1.0, derivs.dtype)
    hvp = timeit(lambda: derivs.hvp(x, y, v, one, zero), repeats, min_time=min_time)
    record(section, "HVP / G (same batch)", hvp / g, "G", 2.5, "<=", note=f"{hvp * 1e3:.4g} ms")

    # one LiSSA iteration, as calculate.py runs it: compiled step on the -b minibatch
    b = len(lissa_y)
    solver = LissaSolver(_Objective(derivs, n), 0.01, iter=1, bsize=b, scale=100.0, progress=False)
    h = rand_vec()
    inv_s, keep = tf.constant(1.0 / 100.0, derivs.dtype), tf.constant(1.0 - 0.01 / 100.0, derivs.dtype)
    step = timeit(lambda: solver.step(lissa_x, lissa_y, v, h, inv_s, keep), repeats, min_time=min_time)
    if b == n:
        record(section, f"LiSSA step (b={b}) / G", step / g, "G", 2.5, "<=", note=f"{step * 1e3:.4g} ms")
    else:
        g_b = timeit(lambda: derivs.gradient(lissa_x, lissa_y), repeats, min_time=0.5)
        record(section, f"LiSSA step (b={b}) / G (b={b})", step / g_b, "G", 2.5, "<=",
               note=f"{step * 1e3:.3g} ms, G(b={b}) = {g_b * 1e3:.3g} ms")
        record(section, f"LiSSA step per image / G per image (b={b} vs {n})", (step / b) / (g / n), "G/img",
               note="small batches pay fixed per-call costs")

    # the full solve loop per iteration (archive take + step + the norm check per vector)
    # is measured in the calculate section through run.json.

    # scoring: shares of the batch against T test vectors
    scorer = Scorer(derivs)
    vecs = [rand_vec() for _ in range(t_many)]
    st1, stm = vec_stack(vecs[:1]), vec_stack(vecs)
    s1 = timeit(lambda: scorer.shares(x, y, st1), repeats, min_time=min_time)
    sm = timeit(lambda: scorer.shares(x, y, stm), repeats, min_time=min_time)
    record(section, "scoring, T=1, per-layer split / F", s1 / f, "F", 4, "<=", note=f"{s1 * 1e3:.4g} ms")
    extra = (sm - s1) / (t_many - 1)
    record(section, f"each further test image (T={t_many} - T=1)/{t_many - 1} / F", extra / f, "F", 1.5, "<=",
           note=f"{extra * 1e3:.4g} ms")

    # the original's method on the same batch (or on its first orig_images images, scaled)
    slices, at = [], 0
    for grp in clf.groups:
        slices.append(slice(at, at + len(grp.variables)))
        at += len(grp.variables)
    flat_l = [np.concatenate([np.asarray(t).ravel() for t in vecs[0][sl]]) for sl in slices]
    m = n if orig_images is None else min(orig_images, n)
    xo, yo = x[:m], y[:m]
    orig = timeit(lambda: original_scores(derivs, xo, yo, flat_l, slices), max(1, repeats // 3))
    orig_full = orig * n / m
    # the gain comes from batching: with N images it is bounded by about N x (per-image cost / batch cost),
    # so the >= 20x target is only judged on real batches (N >= 64; the demo's 256)
    target = (20, ">=") if n >= 64 else (None, None)
    record(section, "speed-up of batched scoring over the original (T=1)", orig_full / s1, "x", *target,
           note=f"original {orig_full * 1e3:.4g} ms for {n} img" + ("" if m == n else f" (timed on {m})")
           + ("" if n >= 64 else f"; batch of {n}: not judged"))
    ref = original_scores(derivs, xo, yo, flat_l, slices)  # once more, for the check
    mine = scorer.shares(xo, yo, st1)[0]
    err = np.max(np.abs(mine - ref)) / max(np.max(np.abs(ref)), 1e-30)
    say(f"  check: batched shares vs per-image gradients, max rel. difference {err:.2e}")
    say(f"  ({time.perf_counter() - t0:.0f} s)")
    return dict(f=f, g=g, hvp=hvp, step=step, s1=s1, sm=sm, orig=orig_full)


def bench_demo(args):
    import keras  # noqa: F401

    from influence.experiments import demo
    from influence.data import digits
    from influence.model.models import Classifier, make_preprocess, select_params

    model = demo.build_model()
    clf = Classifier(model, make_preprocess("unit"), select_params(model, "all"), "demo cnn")
    images, target = digits.load_digits()
    rng = np.random.default_rng(0)
    idx = rng.choice(len(target), 256, replace=False)
    x = digits.to_rgb(images[idx], demo.SIZE)
    y = target[idx].astype(np.int64)
    b = args.bsize
    engine_bench("demo", clf, x, y, x[:b], y[:b], repeats=5 if args.quick else 15,
                 min_time=0.5 if args.quick else 2.0)


def bench_vgg16(args):
    from influence.model.models import load_classifier

    rng = np.random.default_rng(0)
    n = 4
    x = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    y = rng.integers(0, 1000, n).astype(np.int64)
    specs = ["last:3"] if args.quick else ["last:3", "all"]
    for spec in specs:
        clf = load_classifier("vgg16", "none", "auto", spec)
        engine_bench(f"vgg16 {spec}", clf, x, y, x, y, repeats=2 if (args.quick or spec == "all") else 3)
        del clf


# ----------------------------------------------------------------------------- scripts

def _status_kib(pid, field):
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``) in KiB, or None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _descendants(pid):
    """Pids of all processes below ``pid`` (from ``/proc/*/stat``'s parent pid)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
                parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def run_measured(argv, cwd=None, poll=0.01):
    """Run a subprocess; return (returncode, wall seconds, peak RSS of the main process in MiB,
    peak summed RSS of the process tree in MiB, stderr tail).

    Read from ``/proc`` while it runs (Linux; no extra package): the main peak is the largest
    ``VmHWM`` seen (the kernel's own high-water mark of this process, reset at ``exec``), the tree
    peak the largest sum of ``VmRSS`` over the process and its descendants at one poll.
    Without ``/proc`` the main peak falls back to ``ru_maxrss`` of ``wait4`` (KiB on Linux) and
    the tree peak is not measured (0).

    (``ru_maxrss`` is not the first choice: Linux keeps it across ``exec``, so a child forked
    from this process, which holds VGG16, would report this process's size.)"""
    have_proc = os.path.isdir("/proc/self")
    t0 = time.perf_counter()
    err_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err_file)
    tree_peak = main_peak = 0  # KiB
    usage = None
    polls = 0
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            break
        if have_proc:
            hwm = _status_kib(proc.pid, "VmHWM")
            if hwm is not None:
                main_peak = max(main_peak, hwm)
            # the tree walk reads all of /proc: do it every 10th poll
            if polls % 10 == 0:
                tree = [proc.pid] + _descendants(proc.pid)
                total = sum(_status_kib(p, "VmRSS") or 0 for p in tree)
                tree_peak = max(tree_peak, total)
        polls += 1
        time.sleep(poll)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if not have_proc and usage is not None:
        main_peak = usage.ru_maxrss
    tree_peak = max(tree_peak, main_peak)
    err_file.seek(0)
    tail = err_file.read().decode(errors="replace")[-2000:]
    return proc.returncode, wall, main_peak / 1024, tree_peak / 1024, tail


def make_images(root, n, size=64, seed=0):
    """``n`` JPEGs of ``size``x``size`` in 10 class folders: upscaled digits with noise."""
    from PIL import Image

    from influence.data import digits

    images, target = digits.load_digits()
    rng = np.random.default_rng(seed)
    base = digits.to_rgb(images, size)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        k = i % len(target)
        noisy = np.clip(base[k].astype(np.int16) + rng.integers(-20, 21, base[k].shape), 0, 255).astype(np.uint8)
        path = root / f"c{target[k]}" / f"{i:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        files.append(path)
    return files


def bare_pil(files, size):
    """Seconds to decode and resize ``files`` with PIL alone (nearest, prepare_data.py's default)."""
    from PIL import Image

    t0 = time.perf_counter()
    for p in files:
        with Image.open(p) as img:
            arr = np.asarray(img.convert("RGB").resize((size, size), Image.NEAREST), dtype=np.uint8)
    assert arr.shape == (size, size, 3)
    return time.perf_counter() - t0


def bench_prepare(args):
    say("[prepare] prepare_data.py vs bare PIL decode + resize (64x64 JPEG -> 32x32)")
    counts = (1000, 10000)
    big = counts[-1]
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        t0 = time.perf_counter()
        sets = {}
        for n in counts:
            sets[n] = make_images(tmp / f"img{n}" / "train", n)
        say(f"  wrote {sum(counts)} images in {time.perf_counter() - t0:.1f} s")
        # warm the page cache for both contenders
        bare_pil(sets[big], 32)
        bare = min(bare_pil(sets[big], 32) for _ in range(2))
        record("prepare", f"bare PIL, 1 process, {big} images", big / bare, "img/s")
        workers = len(os.sched_getaffinity(0))
        # start-up alone (interpreter, imports, pool): the script on 10 images
        make_images(tmp / "img10" / "train", 10)
        starts = [run_script("prepare", "prepare_data.py on 10 images (start-up)",
                             [sys.executable, str(REPO / "prepare_data.py"), "-tr", str(tmp / "img10" / "train"),
                              "--size", "32", "--out", str(tmp / f"out10_{k}"), "--workers", "1"])
                  for k in range(3)]
        if not all(ok for ok, *_ in starts):
            return  # the script fails on 10 images: the larger runs would only fail the same way
        start = min(wall for _, wall, *_ in starts)
        say(f"  start-up: prepare_data.py on 10 images takes {start:.2f} s")
        peaks = {}
        for n in counts:
            for w in ([1, workers] if n == big else [workers]):
                out = tmp / f"out{n}_{w}"
                argv = [sys.executable, str(REPO / "prepare_data.py"), "-tr", str(tmp / f"img{n}" / "train"),
                        "--size", "32", "--out", str(out), "--workers", str(w)]
                ok, wall, peak, tree, _ = run_script("prepare", f"prepare_data.py {n} images, {w} worker(s)", argv)
                if not ok:
                    continue
                say(f"  prepare_data.py {n} images, --workers {w}: {wall:.2f} s wall, peak RSS {peak:.0f} MiB "
                    f"(main), {tree:.0f} MiB (all processes)")
                if n == big:
                    rate, steady = n / wall, n / max(wall - start, 1e-9)
                    record("prepare", f"prepare_data.py --workers {w} / bare PIL 1 process, whole script",
                           rate / (big / bare), "ratio", note=f"{rate:.0f} img/s incl. {start:.2f} s start-up")
                    target = (0.8, ">=") if w == 1 else (None, None)
                    record("prepare", f"prepare_data.py --workers {w} / bare PIL 1 process, less start-up",
                           steady / (big / bare), "ratio", *target, note=f"{steady:.0f} img/s")
                if w == workers:
                    peaks[n] = (peak, tree)
        if len(peaks) == 2:
            record("prepare", f"peak RSS, main process, {big} / {counts[0]} images",
                   peaks[big][0] / peaks[counts[0]][0], "ratio", 1.2, "<=",
                   note=f"{peaks[counts[0]][0]:.0f} -> {peaks[big][0]:.0f} MiB")
            record("prepare", f"peak RSS, all processes, {big} / {counts[0]} images",
                   peaks[big][1] / peaks[counts[0]][1], "ratio", 1.2, "<=",
                   note=f"{peaks[counts[0]][1]:.0f} -> {peaks[big][1]:.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_demo_data(root, n_train=DEMO_TRAIN, epochs=DEMO_EPOCHS):
    """Build the demo's folders, archives and trained model under ``root`` (as ``make demo`` does)."""
    from influence.experiments import demo

    data = demo.write_folders(root, n_train=n_train)
    model, _ = demo.train_model(*data["train"][:2], epochs=epochs)
    model.save(root / "model.keras")
    argv, _, _ = demo.command(demo.COMMANDS[0], str(root))
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:  # the caller's section reports it as a failure, with these lines
        raise RuntimeError(f"prepare_data.py exited with code {done.returncode} building {root}:\n"
                           + "\n".join(last_lines(done.stderr)))
    return root


def demo_data(tmp):
    """The demo folder (``demo/`` if complete, else one built under ``tmp`` as ``make demo`` builds it:
    a model trained to near a minimum, so that LiSSA at λ = 0.01 converges on it)."""
    root = REPO / "demo"
    if all((root / f).exists() for f in ("train.npz", "test.npz", "model.keras")):
        return root
    root = tmp / "demo"
    t0 = time.perf_counter()
    say(f"  demo/ is missing: building it in {root} ({DEMO_TRAIN} images, {DEMO_EPOCHS} epochs)")
    build_demo_data(root, DEMO_TRAIN, DEMO_EPOCHS)
    say(f"  built in {time.perf_counter() - t0:.0f} s")
    return root


def bench_calculate(args):
    import json

    tmp = Path(tempfile.mkdtemp(prefix="bench_calc_"))
    try:
        root = demo_data(tmp)
        out = tmp / "calc_output"
        iters = 100 if args.quick else 300
        argv = [sys.executable, str(REPO / "calculate.py"), "--data", str(root), "--model", str(root / "model.keras"),
                "--preprocess", "unit", "-i", str(iters), "-b", str(args.bsize), "-sf", "png", "--out", str(out),
                "--folders", "orig", "--limit", "1"]
        say(f"[calculate] calculate.py on {root} (orig, 1 image per class, -i {iters} -b {args.bsize})")
        ok, wall, peak, tree, _ = run_script("calculate", "calculate.py", argv)
        if not ok:
            return
        run = json.loads((out / "run.json").read_text())
        done = run["counts"]["test_images_done"]
        tm = run["timings"]
        solver = run.get("solver_info") or {}
        say("  run.json timings: " + ", ".join(f"{k} {v:.2f}" for k, v in tm.items()))
        record("calculate", f"seconds per test image (wall / {done}, whole script)", wall / done, "s",
               note=f"{wall:.1f} s wall")
        lissa_steps = done * iters
        record("calculate", "LiSSA: ms per iteration per test image (solve loop)",
               tm.get("inverse_hvp_s", float("nan")) / lissa_steps * 1e3, "ms",
               note=f"inverse_hvp_s {tm.get('inverse_hvp_s', 0):.1f} over {lissa_steps} steps"
               + (f", scale {solver['scale']:.3g}" if "scale" in solver else ""))
        record("calculate", "peak RSS of calculate.py", peak, "MiB", note=f"{run['train_images']} training images")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _krylov_model(tmp):
    """(model path, train archive path) of the LDS panel's frozen demo CNN (``lds_cache/demo``) when it is
    there, else of the demo built under ``tmp``."""
    panel = REPO / "lds_cache" / "demo"
    if (panel / "model.keras").exists() and (panel / "train.npz").exists():
        return panel / "model.keras", panel / "train.npz"
    root = demo_data(tmp)
    return root / "model.keras", root / "train.npz"


def bench_krylov(args):
    """The krylov fit (products, seconds; a cached rerun takes none) and dpcg against cg: whole-set passes
    per test image to the same relative residual, auto damping, on the demo CNN."""
    from influence.api import Influence
    from influence.curvature import make_solver

    tmp = Path(tempfile.mkdtemp(prefix="bench_krylov_"))
    try:
        model, train = _krylov_model(tmp)
        say(f"[krylov] {model}")
        inf = Influence(str(model), str(train), solver="krylov", preprocess="unit", cache=tmp / "curvature",
                        progress=False)
        obj = inf.objective
        t0 = time.perf_counter()
        inf.fit()
        fit_s = time.perf_counter() - t0
        info = inf.solver.info
        record("krylov", "fit: whole-set products per pair asked", info["products"] / info["rank_fitted"], "x",
               2.0, "<=", note=f"{info['products']} products for {info['rank_fitted']} pairs "
                               f"({info['converged']} converged, rank {info['rank']} kept), {fit_s:.0f} s")
        calls = []
        inner = obj.hvp_full
        obj.hvp_full = lambda v, indices=None: calls.append(1) or inner(v, indices)
        again = Influence(str(model), str(train), solver="krylov", preprocess="unit", cache=tmp / "curvature",
                          progress=False)
        again.objective.hvp_full = obj.hvp_full
        again.fit()
        record("krylov", "cached rerun: products", len(calls), "", 0, "<=", note=f"loaded: {again.loaded}")
        obj.hvp_full = inner
        rng = np.random.default_rng(0)
        tests = 2 if args.quick else 3
        idx = rng.choice(obj.n, tests, replace=False)
        x, y = obj.archive.take(np.sort(idx))
        vs = [obj.d.gradient(x[k:k + 1], y[k:k + 1].astype(np.int64)) for k in range(tests)]
        hvp_s = timeit(lambda: obj.hvp_full(vs[0]), 3)
        tol = 1e-3
        lam = inf.solver.damping
        passes = {}
        for name in ("cg", "dpcg"):
            s = make_solver(name, obj, lam, cg_tol=tol, cg_maxiter=2000, progress=False)
            if name == "dpcg":
                s.load_state(inf.solver.state())
            t0 = time.perf_counter()
            s.solve(vs)
            passes[name] = (float(np.mean(s.info["hvp_passes"])), time.perf_counter() - t0)
        record("krylov", f"dpcg / cg whole-set passes to residual {tol:g}", passes["dpcg"][0] / passes["cg"][0], "x",
               1 / 3, "<=", note=f"cg {passes['cg'][0]:.0f}, dpcg {passes['dpcg'][0]:.0f} per test image "
                                f"(λ = {lam:.3g}; one pass {hvp_s:.2f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_truth(args):
    """Truth per second from the LDS panels' last runs (``docs/lds*.json``, written by ``make lds``):
    per solver its LDS, its compute, the distance to the dense GGN at calculate.py's damping, and its
    compute over cg's."""
    import json

    files = sorted((REPO / "docs").glob("lds*.json"))
    if not files:
        raise RuntimeError("no docs/lds*.json: run the LDS panels first (python -m influence.validate --panels lds "
                           "--out docs/validate.png [--lds-model bn])")
    for path in files:
        panel = json.loads(path.read_text())
        rows = {r["name"]: r for r in panel["rows"]}
        model = panel.get("model", "demo")
        dense = [r for r in panel["rows"] if r["name"].startswith("dense")]
        cg = rows.get("cg")
        say(f"[truth] {path.name}: {model}, {len(panel['test_keys'])} test images, {panel['subsets']} subsets")
        for r in panel["rows"]:
            if r["lds_mean"] is None or r["name"].startswith("dense") or r["name"] == "random":
                continue
            note = f"LDS {r['lds_mean']:.3f}, compute {r['compute']:.0f} s"
            if cg and cg.get("compute") and r["name"] != "gradient dot product":
                note += f", {r['compute'] / cg['compute']:.2f} x cg's compute"
            record(f"truth ({model})", r["name"], r["lds_mean"], "LDS", note=note)
        for r in dense:
            record(f"truth ({model})", r["name"] + " " + r["options"].split(" (")[0], r["lds_mean"], "LDS")


# ----------------------------------------------------------------------------- report

def bench_outputs(args):
    """Writing a test image's files against scoring it, before (:data:`benchmarks.outputs.BASELINE`) and now:
    per output kind in one process, and whole calculate.py runs (benchmarks/outputs.py)."""
    import json

    from benchmarks import outputs as bo

    tmp = Path(tempfile.mkdtemp(prefix="bench_outputs_"))
    base = None
    try:
        demo_root = demo_data(tmp)
        base = bo.baseline_tree(tmp, say)
        trees = ([("before", base)] if base else []) + [("after", REPO)]
        say(f"[outputs] per output kind, {bo.KIND_IMAGES} test images of the demo's training archive, png")
        kinds = {label: bo.kind_times(tree, demo_root / "train.npz") for label, tree in trees}
        for kind in kinds["after"]:
            before = kinds.get("before", {}).get(kind)
            record("outputs", f"{kind}: ms per test image", kinds["after"][kind] * 1e3, "ms",
                   note="" if before is None else f"before {before * 1e3:.1f} ms "
                                                 f"({before / kinds['after'][kind]:.1f}x)")
        totals = {label: sum(k.values()) for label, k in kinds.items()}
        mlp = bo.build_mlp_data(tmp / "mlp")
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
        bo.drop_tree(base)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_memory(args):
    """VGG16 with every parameter at calculate.py's defaults, ``--memory-budget 8``: peak RSS per Fisher kind
    against the budget plus the model's footprint (benchmarks/memory.py)."""
    from benchmarks import memory

    memory.run(args, say, record, run_script, run_measured)


def bench_store(args):
    """The gradient store (issue 31): bytes on disk against N x D x 2, peak RSS writing N and 4 N images, each
    further test image's query per training image in F, a rerun with a new test set (benchmarks/store.py)."""
    from benchmarks import store

    store.run(args, say, record, timeit)


def table(rows):
    lines = ["| section | measure | value | target | result | note |", "|---|---|---:|---|---|---|"]
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.3g} {r['unit']}"
        if r.get("failed"):
            verdict = "**FAILED**"
        else:
            verdict = "" if r["ok"] is None else ("pass" if r["ok"] else "**missed**")
        note = r["note"].replace("|", "\\|")
        lines.append(f"| {r['section']} | {r['name']} | {value} | {r['target'] or ''} | {verdict} | {note} |")
    return "\n".join(lines)


def report(seconds):
    """Print the table and the summary; return the exit code: 1 when a section failed, else 0
    (a missed target is not a failure)."""
    say("")
    say(table(RESULTS))
    measures = [r for r in RESULTS if not r.get("failed")]
    missed = [r for r in measures if r["ok"] is False]
    say(f"\n{len(measures)} measures, {sum(r['ok'] is True for r in measures)} on target, {len(missed)} missed; "
        f"{seconds:.0f} s")
    failures = [r for r in RESULTS if r.get("failed")]
    if not failures:
        return 0
    for r in failures:
        say(f"\nFAILED [{r['section']}] {r['name']}:" + "".join(f"\n    {line}" for line in r["tail"]))
    names = failed_sections()
    say(f"\n{len(names)} section(s) failed: {', '.join(names)}")
    return 1


def write_markdown(path, info, args, seconds):
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    head = (f"{begin}\n## Latest results\n\n"
            f"`python benchmarks/run.py{' --quick' if args.quick else ''}"
            f"{''.join(' --only ' + o for o in args.only or [])}` on {info['date']}: "
            f"{info['cpu']}, {info['cores']} cores, TensorFlow {info['tf']} / Keras {info['keras']}, "
            f"numpy {info['numpy']}, Python {info['python']}; {seconds:.0f} s in all; 1-min load average "
            f"{info['load']} (this benchmark alone adds about 2).\n\n"
            f"{table(RESULTS)}\n{end}")
    old = path.read_text() if path.exists() else ""
    kept = [line for line in re.findall(r"^\| [^|]+ \|.*$", old.split(begin)[-1].split(end)[0], flags=re.M)
            if not line.startswith("| section") and (args.only and line.split("|")[1].strip().split()[0]
                                                       not in args.only)]
    if kept:
        head = head.replace(f"\n{end}", "\n" + "\n".join(kept) + f"\n\nRows of sections not rerun "
                            f"({', '.join(sorted({k.split('|')[1].strip().split()[0] for k in kept}))}) are kept "
                            f"from an earlier run.\n{end}")
    text = old if old else (
        "# Benchmarks\n\nMeasured by `python benchmarks/run.py` (see `benchmarks/README.md`). Units: F = one "
        "forward pass of the batch, G = one gradient step on the same batch, both compiled.\n\n"
        f"{begin}\n{end}\n")
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: head, text, flags=re.S)
    else:
        text += "\n" + head + "\n"
    path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, VGG16 last:3 only, shorter calculate run")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    p.add_argument("-b", "--bsize", type=int, default=32, help="LiSSA minibatch of the demo (default: 32, as the demo)")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    import logging

    logging.basicConfig(level=logging.ERROR)
    import tensorflow as tf  # noqa: F401

    info = machine()
    load_before = os.getloadavg()[0]
    say(f"{info['cpu']}, {info['cores']} cores, TensorFlow {info['tf']}, Keras {info['keras']}")
    chosen = args.only or list(SECTIONS)
    for name in SECTIONS:
        if name in chosen:
            run_section(name, globals()[f"bench_{name}"], args)
    seconds = time.perf_counter() - t0
    info["load"] = f"{load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    if load_before > 0.5 or os.getloadavg()[0] > (info["cores"] or 1) + 0.5:
        say(f"\nWARNING: other processes were using the CPUs (1-min load average {info['load']}): "
            f"timings are inflated and noisy; rerun on a quiet machine")
    if not args.no_write:
        write_markdown(Path(args.out), info, args, seconds)
        say(f"wrote {args.out}" + (" (failed rows say FAILED)" if failed_sections() else ""))
    return report(seconds)  # its last line names the failed sections, if any


if __name__ == "__main__":
    sys.exit(main())
