"""The ``calculate`` section of ``benchmarks/run.py``: ``calculate.py`` end to end on the demo data.

One image per class of ``orig`` with LiSSA (``-i 300``, ``-i 100`` with ``--quick``; ``-b`` as given):
seconds per test image of the whole script, milliseconds per LiSSA iteration of the solve loop (from
its run.json), and its peak RSS.
"""
import shutil
import sys
import tempfile
from pathlib import Path

from demo_data import demo_data
from harness import REPO, record, run_script, say


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
