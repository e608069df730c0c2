"""The ``store`` section of ``benchmarks/run.py``: the gradient store (``--solver store``, issue 31).

Measured on the demo CNN (``influence.experiments.demo.build_model``: 7 162 parameters, 32x32x3 inputs; its
weights as built -- the store's size, memory and speed do not depend on training) with the demo's digits,
tiled to as many training images as asked, through the public API (``influence.Influence(..., solver="store",
cache=DIR)``):

* bytes on disk of the store folder against the rule ``N x D x 2`` (target: at most 1 % above);
* the memory of writing the store of :data:`RAM_N` and ``4 x RAM_N`` training images, each in its own process
  (two each, one with ``--quick``): the peak of what Python and numpy allocate during the pass (``tracemalloc``:
  the store's own buffers), ratio of the two (target: flat, at most 1.2), and the peak RSS growth (``VmHWM`` after
  the pass minus ``VmRSS`` before it, the peak reset with ``/proc/self/clear_refs`` where the kernel allows it),
  a row without a target: TensorFlow's tracing and kernels take about 730 MiB whatever N, and its RSS steps by
  100-300 MiB at random shards (seen by printing it after every shard, with ``MALLOC_ARENA_MAX=2`` too);
* each further test image's query, per training image, as a fraction of one forward pass of one image (F,
  ``Derivatives.losses`` on a batch of 256, per image): the time of scoring :data:`TESTS` more test images against
  the written store divided by ``TESTS x N`` (the issue's target: 1e-3 F). The product costs ``D`` multiply-adds
  per training image whatever the model, so this ratio falls as the model grows (the demo CNN's forward pass
  is about 0.4 M multiply-adds, ResNet-50's 4 G): a second row divides the product's share (the query less the
  test gradients, :meth:`Influence.test_gradients`) by ResNet-50's F measured on the same machine;
* a rerun with a new test set: a second ``Influence`` on the same cache scores other test images; the rows
  say how many store files it rewrote (target 0) and its time against the first run's store pass.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: projected dimensions and training images of the size, query and rerun rows
DIM, N_TRAIN = 1024, 4096
#: test images of the query row (after as many to warm up) and of each rerun
TESTS = 32
#: the RAM rows: D and the smaller N (the larger is 4 N); N is above one shard (max(1024, 4 D) rows), as the
#: pass holds one shard's rows (``shard_rows x D`` float64) before writing it
RAM_DIM, RAM_N = 256, 2048
#: ResNet-50's batch for its F
RESNET_BATCH = 4


def images(n, seed=0):
    """``n`` demo digits (uint8 (n, 32, 32, 3), int64 labels), the 1 797 tiled with a seeded draw."""
    import numpy as np

    from influence.data import digits
    from influence.experiments import demo

    pixels, target = digits.load_digits()
    idx = np.random.default_rng(seed).integers(0, len(target), n)
    return digits.to_rgb(pixels[idx], demo.SIZE), target[idx].astype(np.int64)


def save_model(path):
    from influence.experiments import demo

    demo.build_model().save(path)
    return path


def influence_on(model, train, dim, cache):
    import influence

    return influence.Influence(str(model), train=train, solver="store", store_dim=dim, damping="1x",
                               preprocess="unit", progress=False, cache=str(cache))


def resnet50_forward(timeit, repeats):
    """Seconds per image of ResNet-50's compiled forward pass (random weights, :data:`RESNET_BATCH` at 224x224)."""
    import keras
    import numpy as np
    import tensorflow as tf

    model = keras.applications.ResNet50(weights=None)
    x = tf.constant(np.random.default_rng(0).random((RESNET_BATCH, 224, 224, 3), np.float32))
    forward = tf.function(lambda batch: model(batch, training=False))
    return min(timeit(lambda: forward(x), repeats) for _ in range(2)) / RESNET_BATCH


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def write_once(model, n, dim, cache):
    """In this process: the store of ``n`` images written -> {baseline_kib, peak_kib, reset, seconds}."""
    import logging

    logging.basicConfig(level=logging.ERROR)
    inf = influence_on(model, images(n, seed=1), dim, cache)
    base = _status_kib("VmRSS")
    try:                                   # the peak from here on (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    tracemalloc.start()                    # what Python and numpy allocate (not TensorFlow's own buffers)
    t0 = time.perf_counter()
    inf.fit()
    seconds, traced = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    return dict(baseline_kib=base, peak_kib=_status_kib("VmHWM"), reset=reset, seconds=seconds,
                traced_kib=traced / 1024, n=n, dim=inf.solver.projection.dim)


def ram_growth(model, n, dim, tmp):
    """:func:`write_once` in a fresh process (its peak is its own), on an empty cache."""
    shutil.rmtree(tmp / f"ram{n}", ignore_errors=True)
    done = subprocess.run([sys.executable, __file__, "--write", str(model), str(n), str(dim), str(tmp / f"ram{n}")],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"writing the store of {n} images failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def store_files(folder):
    """{name: (inode, mtime_ns, size)} of the store's rows and scales."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in Path(folder).iterdir() if p.name.startswith(("rows-", "scale-"))}


def run(args, say, record, timeit):
    """The rows (module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_"))
    repeats = 2 if args.quick else 3
    try:
        model = save_model(tmp / "model.keras")
        train = images(N_TRAIN)
        cache = tmp / "cache"
        say(f"[store] demo CNN, {N_TRAIN} training images, D {DIM}: writing the store")
        first = influence_on(model, train, DIM, cache)
        first.fit()
        info = first.solver.info
        dim, folder = info["store_dim"], Path(info["store"])
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        record("store", f"bytes on disk / (N x D x 2), N {N_TRAIN}, D {dim}", size / (N_TRAIN * dim * 2), "",
               target=1.01, op="<=", note=f"{size / (N_TRAIN * dim * 2):.4f}: {size / 2**20:.2f} MiB; "
                                                         f"pass {info['store_seconds']:.1f} s")

        xt, yt = images(2 * TESTS, seed=2)
        first.scores(xt[TESTS:], yt[TESTS:])                     # warm-up: traces the test gradient
        query = min(timeit(lambda: first.scores(xt[:TESTS], yt[:TESTS]), repeats) for _ in range(2))
        grads = min(timeit(lambda: first.test_gradients(xt[:TESTS], yt[:TESTS]), repeats) for _ in range(2))
        xf, yf = train[0][:256], train[1][:256]
        forward = min(timeit(lambda: first.derivs.losses(xf, yf), repeats * 3) for _ in range(2)) / 256
        per, product = query / (TESTS * N_TRAIN), (query - grads) / (TESTS * N_TRAIN)
        record("store", f"query per test x training image / F per image, demo CNN, D {dim}", per / forward, "F",
               target=1e-3, op="<=", note=f"{per * 1e9:.0f} ns per (test, training) pair, {product * 1e9:.0f} ns of "
                                          f"them the product with the store (the rest: the test gradients over N "
                                          f"{N_TRAIN}); F = {forward * 1e6:.1f} us per image (batch 256); {TESTS} test "
                                          f"images, best of 2 medians")
        big = resnet50_forward(timeit, repeats)
        record("store", f"the product per pair at D {dim} / ResNet-50's F per image", product / big, "F",
               target=1e-3, op="<=", note=f"{product * 1e9:.0f} ns (demo CNN's store above; the product does not "
                                          f"depend on the model) / F {big * 1e3:.0f} ms (ResNet-50, random weights, "
                                          f"batch {RESNET_BATCH} at 224x224, compiled); test gradients, G/N per pair, "
                                          f"left out")

        say("[store] a rerun on the same cache with a new test set")
        before = store_files(folder)
        t0 = time.perf_counter()
        second = influence_on(model, train, DIM, cache)
        xb, yb = images(TESTS, seed=3)
        second.scores(xb, yb)
        rerun = time.perf_counter() - t0
        after = store_files(folder)
        rewritten = sum(before.get(k) != v for k, v in after.items()) + len(set(before) - set(after))
        record("store", "rerun with a new test set: store files rewritten", float(rewritten), "", target=0, op="<=",
               note=f"{len(after)} files; cache loaded: {second.loaded}")
        record("store", "rerun (load, build, score) / first run's store pass", rerun / info["store_seconds"], "",
               note=f"{rerun:.1f} s against {info['store_seconds']:.1f} s for {N_TRAIN} training images")

        say(f"[store] peak RSS growth writing the store of {RAM_N} and {4 * RAM_N} images, D {RAM_DIM}")
        runs = 1 if args.quick else 2
        small, large = ([ram_growth(model, n, RAM_DIM, tmp) for _ in range(runs)] for n in (RAM_N, 4 * RAM_N))
        traced = [min(r["traced_kib"] for r in rs) / 1024 for rs in (small, large)]
        record("store", f"peak numpy/Python memory writing, N {4 * RAM_N} / N {RAM_N} (D {small[0]['dim']})",
               traced[1] / traced[0], "", target=1.2, op="<=",
               note=f"{traced[0]:.1f} / {traced[1]:.1f} MiB (tracemalloc, from the pass's start); least of {runs} "
                    f"process(es) each")
        grow = [sorted((r["peak_kib"] - r["baseline_kib"]) / 1024 for r in rs) for rs in (small, large)]
        record("store", f"peak RSS growth writing, N {4 * RAM_N} / N {RAM_N} (D {small[0]['dim']})",
               grow[1][0] / grow[0][0], "",
               note=f"least {grow[0][0]:.0f} / {grow[1][0]:.0f} MiB of {runs} process(es) each (all: "
                    f"{', '.join(f'{g:.0f}' for g in grow[0])} / {', '.join(f'{g:.0f}' for g in grow[1])}) above "
                    f"{small[0]['baseline_kib'] / 1024:.0f} MiB: TensorFlow's tracing and kernels, and steps of "
                    f"100-300 MiB at random shards (allocator), not a growth with N; peak reset: {small[0]['reset']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_store(args):
    """The gradient store (issue 31): bytes on disk against N x D x 2, peak RSS writing N and 4 N images, each
    further test image's query per training image in F, a rerun with a new test set (:func:`run`)."""
    from harness import record, say, timeit  # here, not at the top: the --write process below stays as it was

    run(args, say, record, timeit)


if __name__ == "__main__" and sys.argv[1:2] == ["--write"]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(REPO))
    print(json.dumps(write_once(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
