"""The ``prepare`` section of ``benchmarks/run.py``: ``prepare_data.py`` against bare PIL.

On generated 64x64 JPEGs resized to 32x32: images per second of the script (with one worker and with one
per core, with and without its start-up) against PIL decoding and resizing in one process, and the
script's peak RSS (main process and all processes) at 1 000 and 10 000 images.
"""
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import REPO, record, run_script, say


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
