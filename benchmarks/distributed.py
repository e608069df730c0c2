#!/usr/bin/env python
"""Scale-out benchmark (issue 11): ``python benchmarks/distributed.py``.

Measures, on this machine and the demo data (1500 training images, 30 test images, the demo CNN):

* ``calculate.py --solver ekfac`` end to end in one process, with ``--workers 1`` and with
  ``--workers 2`` (a fresh ``--out`` each time, so the EK-FAC fit is redone): wall time and the
  run.json timings; the Ray start and each worker's warm-up (its first shard minus a steady one);
* the runtime's own overhead: the start of a local runtime, a no-op task's round trip, putting a
  group's inverse-HVPs into the object store;
* per-image costs in one process (the constants of the cost model): a forward pass F, the two EK-FAC
  passes, scoring with 1 and with 30 test images, reading the archive; the driver's merge rates
  (adding factor sums, loading parts) and a float64 eigendecomposition;

then evaluates the cost model of ``BENCHMARKS.md`` ("Scale-out (issue 11)") for ImageNet-1k with
VGG16 on 1, 8 and 64 GPUs. The measured part and the assumptions are printed apart. ``--write``
replaces the block between the ``scale-out`` markers of ``BENCHMARKS.md``.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parent.parent
#: the GB of this model's rates and sizes: decimal, as network and disk bandwidths are quoted (GB/s); not
#: memory_budget's GB of 2**30 bytes (influence.settings.gb_to_bytes), a different unit on purpose
GB = 1e9
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

from demo_data import build_demo_data  # noqa: E402

BEGIN, END = "<!-- scale-out:begin -->", "<!-- scale-out:end -->"


def say(msg=""):
    print(msg, flush=True)


def load():
    return os.getloadavg()[0]


# ----------------------------------------------------------------------------- data

def demo_data(root):
    """The full demo data set (1500 training images) under ``root``, built once."""
    root = Path(root)
    if all((root / f).exists() for f in ("train.npz", "test.npz", "model.keras")):
        return root
    say(f"building the demo data in {root} (once)")
    return build_demo_data(root, n_train=1500, epochs=30)


# ----------------------------------------------------------------------------- end to end

def run_calculate(data, out, extra):
    argv = [sys.executable, str(REPO / "calculate.py"), "--data", str(data), "--model", str(data / "model.keras"),
            "--preprocess", "unit", "--solver", "ekfac", "-sf", "png", "--top", "3", "--out", str(out),
            "-v", *extra]
    shutil.rmtree(out, ignore_errors=True)      # a fresh --out: no curvature cache, the fit is redone
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"calculate.py {' '.join(extra)} failed:\n{r.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    start = re.search(r"ray: started a local Ray runtime in ([\d.]+) s", r.stderr)
    tasks = [(int(pid), float(sec)) for pid, sec in
             re.findall(r"(?:scored|summed) by pid (\d+) on \S+ in ([\d.]+) s", r.stderr)]
    warm = []
    for pid in sorted({p for p, _ in tasks}):
        mine = [s for p, s in tasks if p == pid]
        if len(mine) >= 2:
            warm.append(mine[0] - statistics.median(mine[1:]))
    return {"wall": wall, "timings": run["timings"], "ray_start": float(start.group(1)) if start else 0.0,
            "warmup": max(warm) if warm else None, "tasks": len(tasks), "scores": _scores(out)}


def _scores(out):
    return {str(p.relative_to(out)): np.load(p) for p in sorted(out.rglob("*_scores.npy"))}


# ----------------------------------------------------------------------------- in-process constants

def median_time(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def min_time(fn, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def per_image_costs(data):
    """ms per training image of F, the two EK-FAC passes, scoring (T = 1, 30) and reading."""
    from influence.data.archive_reader import TrainArchive
    from influence.curvature import make_solver
    from influence.backends.local import score_archive
    from influence.model.derivatives import Derivatives
    from influence.model.objective import TrainingObjective
    from influence.model.vectors import vec_stack
    from influence.model.models import load_classifier
    from influence.scoring import Scorer

    train = TrainArchive(data / "train.npz")
    n = len(train)
    clf = load_classifier(str(data / "model.keras"), "imagenet", "unit", "all")
    d = Derivatives(clf, train.image_shape)
    obj = TrainingObjective(d, train, chunk=256)
    x, y = train.take(np.arange(256))
    y = y.astype(np.int64)
    out = {"n": n, "params": clf.num_params}
    out["F"] = median_time(lambda: d.losses(x, y).numpy(), 10) / 256 * 1e3
    out["read"] = median_time(lambda: [train.take(np.arange(s, min(s + 256, n))) for s in range(0, n, 256)],
                              3) / n * 1e3
    ek = make_solver("ekfac", obj, 0.01, progress=False)
    out["pass1"] = median_time(lambda: ek.factor_sums(keep=True), 3) / n * 1e3
    sums = ek.factor_sums()
    ek.set_factors(sums)
    out["pass2"] = median_time(lambda: ek.eigen_sums(keep=True), 3) / n * 1e3
    scorer = Scorer(d)
    rng = np.random.default_rng(0)
    for t in (1, 30):
        vecs = [tuple(d.dtype.as_numpy_dtype(rng.standard_normal(v.shape)) for v in d.variables) for _ in range(t)]
        stacked = vec_stack(vecs)
        out[f"score{t}"] = median_time(lambda: score_archive(scorer, train, stacked, 256), 3) / n * 1e3
    out["score_extra"] = (out["score30"] - out["score1"]) / 29
    return out


def driver_rates():
    """GB/s of adding float64 sums and of loading parts; seconds of a float64 eigh of 1024 x 1024."""
    a, b = np.ones((4096, 4096)), np.ones((4096, 4096))

    def add():
        a.__iadd__(b)

    add_gbs = a.nbytes / median_time(add, 5) / GB
    tmp = Path(tempfile.mkdtemp(prefix="bench_parts_"))
    try:
        part = np.ones((30, 20000, 16), np.float32)
        np.save(tmp / "p.npy", part)
        load_gbs = part.nbytes / median_time(lambda: np.load(tmp / "p.npy"), 5) / GB
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = np.random.default_rng(0).standard_normal((1024, 1024))
    m = m @ m.T
    eigh_1024 = min_time(lambda: np.linalg.eigh(m), 5)      # the fastest: OpenBLAS suffers most from a busy machine
    return {"add_gbs": add_gbs, "load_gbs": load_gbs, "eigh_1024": eigh_1024, "write_ms": dict_write_ms()}


def dict_write_ms(n=100_000, layers=16):
    """ms per training image of the part of a test image's outputs that grows with N: the original
    tool's score dict (``<n>.npy``) and ``<n>_scores.npy`` (N = 100 000, 16 layers)."""
    from influence.outputs.report import save_score_dict

    rng = np.random.default_rng(0)
    shares = rng.standard_normal((n, layers)).astype(np.float32)
    keys = [f"{i // 200}_{i % 200}" for i in range(n)]
    names = [f"layer{i}" for i in range(layers)]
    tmp = Path(tempfile.mkdtemp(prefix="bench_write_"))
    try:
        def write():
            save_score_dict(tmp / "0.npy", keys, names, shares, shares.sum(axis=1))
            np.save(tmp / "0_scores.npy", shares.sum(axis=1))

        return median_time(write, 2) / n * 1e3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ray_overhead(vector_bytes):
    """Local runtime start (s), a no-op task's round trip (ms), putting 30 inverse-HVPs (ms)."""
    from influence.backends import ray_runtime, ray_worker

    t0 = time.perf_counter()
    ray = ray_runtime.init_ray(workers=2, gpus=0)
    start = time.perf_counter() - t0
    try:
        noop = ray.remote(num_cpus=1)(ray_worker.import_tensorflow)
        ray.get([noop.remote() for _ in range(2)])
        t0 = time.perf_counter()
        ray.get([noop.remote() for _ in range(100)])
        task_ms = (time.perf_counter() - t0) / 100 * 1e3
        stacked = [np.ones(vector_bytes // 8 * 30, np.float64)]
        t0 = time.perf_counter()
        ref = ray.put(stacked)
        put_ms = (time.perf_counter() - t0) * 1e3
        del ref
    finally:
        ray.shutdown()
    return {"start": start, "task_ms": task_ms, "put_ms": put_ms}


# ----------------------------------------------------------------------------- the cost model

IMAGENET = 1_281_167
IMAGE_BYTES = 224 * 224 * 3
#: VGG16 Dense/Conv layers: (name, output positions P, K = kernel inputs, C = output channels)
VGG16 = ([("block1_conv1", 224 * 224, 27, 64), ("block1_conv2", 224 * 224, 576, 64),
          ("block2_conv1", 112 * 112, 576, 128), ("block2_conv2", 112 * 112, 1152, 128),
          ("block3_conv1", 56 * 56, 1152, 256)] + [(f"block3_conv{i}", 56 * 56, 2304, 256) for i in (2, 3)]
         + [("block4_conv1", 28 * 28, 2304, 512)] + [(f"block4_conv{i}", 28 * 28, 4608, 512) for i in (2, 3)]
         + [(f"block5_conv{i}", 14 * 14, 4608, 512) for i in (1, 2, 3)]
         + [("fc1", 1, 25088, 4096), ("fc2", 1, 4096, 4096), ("predictions", 1, 4096, 1000)])
VGG16_PARAMS = 138_357_544

#: assumptions (on paper), one line each in the printed table
ASSUME = {
    "F_gpu_ms": 0.25,          # VGG16 forward per image on one H100/H200-class GPU, float32/TF32, batch 64
    "fp64_tflops": 40.0,       # sustained float64 GEMM rate of that GPU (the factor sums are float64)
    "driver_eigh_scale": 1.0,  # driver CPU relative to this one for eigh (a server: more cores; kept 1)
    "gpus_per_node": 8,
    "net_gbs": 12.5,           # per node (100 Gb/s)
    "fs_gbs": 5.0,             # shared filesystem, aggregate read
    "local_gbs": 3.0,          # local NVMe per node (the copy-per-node layout)
    "test_images": 100,        # test images scored per pass (one group: --memory-budget ~ 120 GB)
    "layers": 16,              # VGG16 layers with weights: columns of a part
    "max_block": 4096,
    "warmup_s": 20.0,          # a GPU task's fresh process: TensorFlow + CUDA start, VGG16 load, tracing
}
#: measured on this CPU by benchmarks/run.py (BENCHMARKS.md, "vgg16 all"): G / F, scoring with T = 1
#: and each further test image, in F
VGG16_MEASURED = {"G_over_F": 2.91, "score1_over_F": 2.6, "extra_over_F": 1.26}


def vgg16_fit_terms(max_block):
    """Per image: float64 FLOP of the factor sums (pass 1) and of the rotations + G̃ (pass 2); bytes
    of one shard's pass-1 sums and pass-2 sums (Λ); Σ b³ over the factor blocks (eigh)."""
    from influence.curvature.kfac.plan import split_blocks

    flop1 = flop2 = bytes1 = bytes2 = cube = 0
    for _, p, k, c in VGG16:
        k1 = k + 1
        ab, sb = split_blocks(k1, max_block), split_blocks(c, max_block)
        sq_a = sum((e - s) ** 2 for s, e in ab)
        sq_s = sum((e - s) ** 2 for s, e in sb)
        flop1 += 2 * p * (sq_a + sq_s)
        flop2 += 2 * p * (sq_a + sq_s) + 2 * p * k1 * c + 2 * k1 * c
        bytes1 += 8 * (sq_a + sq_s)
        bytes2 += 8 * k1 * c
        cube += sum((e - s) ** 3 for s, e in ab) + sum((e - s) ** 3 for s, e in sb)
    return flop1, flop2, bytes1, bytes2, cube


def cost_model(m, gpus, t=None, a=ASSUME):
    """Seconds per stage for ImageNet-1k, VGG16 (--params all), ``gpus`` GPUs, ``t`` test images per
    scoring pass; ``m``: the constants measured here."""
    n = IMAGENET
    f = a["F_gpu_ms"] / 1e3
    t = a["test_images"] if t is None else t
    nodes = max(1, -(-gpus // a["gpus_per_node"]))
    flop1, flop2, bytes1, bytes2, cube = vgg16_fit_terms(a["max_block"])
    g_over_f = VGG16_MEASURED["G_over_F"]       # forward + backward of each pass
    shards = min(64, -(-n // 200))              # MAX_SHARDS; 200 images per archive batch (-bs 200)
    fs_bw = min(a["fs_gbs"], nodes * a["net_gbs"]) * GB
    local_bw = nodes * a["local_gbs"] * GB
    fp64 = a["fp64_tflops"] * 1e12
    score_per_image = (VGG16_MEASURED["score1_over_F"] + (t - 1) * VGG16_MEASURED["extra_over_F"]) * f
    parts = t * n * a["layers"] * 4
    vectors = t * VGG16_PARAMS * 4
    return {
        "nodes": nodes, "shards": shards,
        "read a pass (shared FS)": n * IMAGE_BYTES / fs_bw,
        "read a pass (copy per node)": n * IMAGE_BYTES / local_bw,
        "fit: compute, 2 passes": n * (2 * g_over_f * f + (flop1 + flop2) / fp64) / gpus,
        "fit: worker start per shard": 2 * shards * a["warmup_s"] / gpus,
        "fit: driver adds shard sums": shards * (bytes1 + bytes2) / min(a["net_gbs"] * GB, m["add_gbs"] * GB),
        "fit: driver eigh": cube / 1024 ** 3 * m["eigh_1024"],   # eigh time grows as n³: from 1024³ (not bytes)
        "score: compute": n * score_per_image / gpus,
        "score: worker start per shard": shards * a["warmup_s"] / gpus,
        "score: broadcast inverse-HVPs": vectors * nodes / (a["net_gbs"] * GB),
        "score: driver loads parts": parts / fs_bw + parts / (m["load_gbs"] * GB),
        "score: driver writes outputs": t * n * m["write_ms"] / 1e3,
        "score_per_image": score_per_image,
        "sums_gb": (bytes1 + bytes2) / GB, "parts_gb": parts / GB, "vectors_gb": vectors / GB,
    }


def breakeven(m, t):
    """GPUs at which a scoring pass's compute time falls to the shared filesystem's read time, and to
    the driver's serial work (loading parts + writing outputs)."""
    c = cost_model(m, 1, t)
    compute = c["score: compute"]
    driver = c["score: driver loads parts"] + c["score: driver writes outputs"]
    return compute / c["read a pass (shared FS)"], compute / driver


# ----------------------------------------------------------------------------- report

def fmt_s(x):
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 60:
        return f"{x / 60:.1f} min"
    return f"{x:.3g} s"


def report(e2e, costs, rates, ray, info):
    lines = [BEGIN, "### Measured on this machine (1 vs 2 workers on the demo)", "",
             f"`python benchmarks/distributed.py --write` on {info['date']}: {info['cpu']}, {os.cpu_count()} cores, "
             f"Ray {info['ray']}; demo data: {costs['n']} training images (8 archive batches = 8 shards), "
             f"30 test images in one group, the demo CNN ({costs['params']} parameters), `--solver ekfac`. 1-min "
             f"load average {info['load0']:.1f} at the start, {info['load1']:.1f} at the end (other engineers' jobs "
             f"shared the 2 cores).", "",
             "| run | wall | Ray start | fit (curvature_s) | scoring_s | writing_s | worker warm-up | scores |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in e2e.items():
        tm = r["timings"]
        same = "reference" if name == "one process" else r["same"]
        warm = "" if r["warmup"] is None else f"{r['warmup']:.1f} s"
        lines.append(f"| {name} | {r['wall']:.1f} s | {r['ray_start']:.1f} s | {tm.get('curvature_s', 0):.1f} s | "
                     f"{tm.get('scoring_s', 0):.1f} s | {tm.get('writing_s', 0):.1f} s | {warm} | {same} |")
    one, w1, w2 = (e2e[k] for k in ("one process", "--workers 1", "--workers 2"))
    lines += ["",
              f"* Overhead of the runtime: `--workers 1` takes {w1['wall'] - one['wall']:+.1f} s over one process "
              f"({(w1['wall'] / one['wall'] - 1) * 100:+.0f} %): Ray's start ({w1['ray_start']:.1f} s here; "
              f"{ray['start']:.1f} s when started alone), the worker's warm-up (TensorFlow import, model load, "
              f"tracing: {w1['warmup'] or 0:.1f} s) and the tasks. A no-op task's round trip is "
              f"{ray['task_ms']:.2f} ms; putting 30 "
              f"inverse-HVPs of the demo CNN into the object store {ray['put_ms']:.2f} ms.",
              f"* 1 vs 2 workers: {w1['wall']:.1f} s vs {w2['wall']:.1f} s wall "
              f"({w1['wall'] / w2['wall']:.2f}x); fit {w1['timings'].get('curvature_s', 0):.1f} vs "
              f"{w2['timings'].get('curvature_s', 0):.1f} s, scoring {w1['timings'].get('scoring_s', 0):.1f} vs "
              f"{w2['timings'].get('scoring_s', 0):.1f} s. On 2 cores one process already runs TensorFlow on both "
              f"cores, so two workers add a second TensorFlow and model copy, not compute.",
              "", "Per-image costs in one process (ms per training image; the constants of the cost model):", "",
              "| F (forward) | EK-FAC pass 1 | pass 2 | score, T = 1 | each further test image | read (page cache) |",
              "|---:|---:|---:|---:|---:|---:|",
              f"| {costs['F']:.4f} | {costs['pass1']:.3f} ({costs['pass1'] / costs['F']:.1f} F) | "
              f"{costs['pass2']:.3f} ({costs['pass2'] / costs['F']:.1f} F) | {costs['score1']:.3f} "
              f"({costs['score1'] / costs['F']:.1f} F) | {costs['score_extra']:.4f} "
              f"({costs['score_extra'] / costs['F']:.2f} F) "
              f"| {costs['read']:.4f} |", "",
              f"Driver rates: adding float64 sums {rates['add_gbs']:.2f} GB/s, loading parts "
              f"{rates['load_gbs']:.2f} GB/s "
              f"(page cache), float64 eigh of 1024 x 1024 {rates['eigh_1024']:.2f} s (fastest of 5); the outputs of "
              f"one test image that grow with the training set (the score dict `<n>.npy` and `<n>_scores.npy`, "
              f"16 layers) "
              f"{rates['write_ms'] * 1e3:.2f} µs per training image."]
    return "\n".join(lines)


def assumptions_text(m):
    a = ASSUME
    return "\n".join([
        "Measured here and used by the model: the driver's rates above (adding sums, loading parts, eigh, "
        f"writing: {m['write_ms'] * 1e3:.1f} µs per training image per test image), and, from `benchmarks/run.py` "
        f"on this CPU (table above, \"vgg16 all\"), VGG16's G = {VGG16_MEASURED['G_over_F']} F, scoring "
        f"{VGG16_MEASURED['score1_over_F']} F per image for one test image and {VGG16_MEASURED['extra_over_F']} F "
        "for each further one. VGG16 layer shapes give the float64 work of the factor passes exactly "
        "(`vgg16_fit_terms`).", "",
        "Assumed (on paper, not measured):", "",
        f"* F = {a['F_gpu_ms']} ms per image for VGG16 on one H100/H200-class GPU (float32/TF32, batch 64), and "
        f"{a['fp64_tflops']:g} TFLOP/s for the float64 factor GEMMs;",
        f"* {a['gpus_per_node']} GPUs per node, {a['net_gbs']:g} GB/s network per node, a shared filesystem "
        f"reading {a['fs_gbs']:g} GB/s in all, local NVMe {a['local_gbs']:g} GB/s per node;",
        f"* a GPU task's process starts fresh (Ray's default for GPU tasks): {a['warmup_s']:g} s for TensorFlow, "
        "CUDA, VGG16 and tracing, per shard;",
        f"* 224 x 224 images (150 KB each), batches of 200, so {min(64, -(-IMAGENET // 200))} shards; scoring passes "
        f"hold {a['test_images']} test images (`--memory-budget` about 120 GB: each inverse-HVP is 553 MB); "
        "driver CPU as fast as this one."])


def model_table(m):
    cols = [cost_model(m, g) for g in (1, 8, 64)]
    keys = ["read a pass (shared FS)", "read a pass (copy per node)", "fit: compute, 2 passes",
            "fit: worker start per shard", "fit: driver adds shard sums", "fit: driver eigh", "score: compute",
            "score: worker start per shard", "score: broadcast inverse-HVPs", "score: driver loads parts",
            "score: driver writes outputs"]
    lines = ["| stage (ImageNet-1k, VGG16 `--params all`; scoring: one pass for 100 test images) | 1 GPU | "
             "8 GPUs (1 node) | 64 GPUs (8 nodes) |", "|---|---:|---:|---:|"]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(fmt_s(c[k]) for c in cols) + " |")
    c = cols[0]
    fs1, drv1 = breakeven(m, 1)
    fs100, drv100 = breakeven(m, 100)
    lines += ["", f"Sizes: one shard's factor sums {c['sums_gb']:.2f} GB (pass 1 + pass 2), the parts of one group "
              f"{c['parts_gb']:.1f} GB, 100 inverse-HVPs {c['vectors_gb']:.1f} GB; {c['shards']} shards of about "
              f"{IMAGENET // c['shards']} images.",
              f"Break-even (compute per pass = the other): shared filesystem at {fs1:.0f} GPUs with 1 test image per "
              f"pass, {fs100:.0f} GPUs with 100; driver's serial work at {drv1:.0f} GPUs (1) and {drv100:.0f} GPUs "
              f"(100)."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="demo data folder (default: built once under --work)")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "influence-bench-distributed"))
    p.add_argument("--write", action="store_true", help="replace the scale-out block of BENCHMARKS.md")
    args = p.parse_args(argv)
    import platform

    import ray

    work = Path(args.work)
    data = Path(args.data) if args.data else demo_data(work / "demo")
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
            "ray": ray.__version__, "load0": load()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    e2e = {}
    for name, extra in (("one process", []), ("--workers 1", ["--workers", "1"]), ("--workers 2", ["--workers", "2"])):
        say(f"[end to end] calculate.py --solver ekfac {' '.join(extra)}")
        e2e[name] = run_calculate(data, work / f"out-{len(e2e)}", extra)
        say(f"  wall {e2e[name]['wall']:.1f} s, timings {e2e[name]['timings']}")
    ref = e2e["one process"]["scores"]
    for name, r in e2e.items():
        worst = max(float(np.max(np.abs(r["scores"][k] - v)) / max(float(np.max(np.abs(v))), 1e-300))
                    for k, v in ref.items())
        r["same"] = "identical" if worst == 0 else f"max rel. diff {worst:.1e}"
    say("[driver] merge rates, eigh, writing (before TensorFlow runs in this process)")
    rates = driver_rates()
    say(f"  {rates}")
    say("[per image] one process")
    costs = per_image_costs(data)
    say(f"  {costs}")
    from influence.model.models import load_classifier

    clf = load_classifier(str(data / "model.keras"), "imagenet", "unit", "all")
    ray_cost = ray_overhead(clf.num_params * 4)
    say(f"  {ray_cost}")
    info["load1"] = load()
    measured = {"warmup": max(r["warmup"] or 0 for r in e2e.values()), "task_ms": ray_cost["task_ms"],
                "add_gbs": rates["add_gbs"], "load_gbs": rates["load_gbs"], "eigh_1024": rates["eigh_1024"],
                "write_ms": rates["write_ms"]}
    text = "\n".join([report(e2e, costs, rates, ray_cost, info), "",
                      "### Cost model for ImageNet-1k with VGG16 (on paper, from the constants above)", "",
                      assumptions_text(measured), "", model_table(measured), END])
    say("\n" + text + "\n")
    say("\nconstants: " + json.dumps(measured))
    if args.write:
        path = REPO / "BENCHMARKS.md"
        doc = path.read_text()
        if BEGIN in doc and END in doc:
            doc = doc[:doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
            path.write_text(doc)
            say(f"wrote {path}")
        else:
            say(f"{path} has no {BEGIN} block: not written")


if __name__ == "__main__":
    main()
