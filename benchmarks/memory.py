"""The ``memory`` section of ``benchmarks/run.py``: the seed's own model at its defaults, run as a user runs it.

VGG16 with every parameter (``--model vgg16 --weights none --params all --memory-budget 8``, no
``--solver``: ``auto`` picks the gradient store, whose ``--fisher auto`` is ``top:10`` for 1 000 classes; ekfac,
the default before it, is the second row), on
:data:`TRAIN` training and :data:`TEST` test JPEGs of 224² in class folders (``prepare_data.py``), once per
Fisher kind of :data:`FISHERS`. Each run's peak RSS (the main process's ``VmHWM``) is a row with the
target ``memory_budget + MODEL_GB``: what the plan may spend plus the model's own footprint (VGG16's
weights, TensorFlow, the Keras graph: about 2 GiB before anything is fitted). ``--fisher true`` is
refused for 1 000 classes: its row checks the refusal is one line with exit code 2, before any work.
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: training and test images (two classes each), 224² like ImageNet's
TRAIN, TEST, SIZE = 8, 2, 224
BUDGET_GB, MODEL_GB = 8, 2
#: (row label, extra calculate.py flags); --quick runs the first only (the default)
FISHERS = (("default (auto: store, fisher top:10)", []),
           ("--solver ekfac (fisher top:10)", ["--solver", "ekfac"]),
           ("--solver ekfac --fisher sampled", ["--solver", "ekfac", "--fisher", "sampled"]),
           ("--solver ekfac --fisher empirical", ["--solver", "ekfac", "--fisher", "empirical"]),
           ("--solver pcg (EK-FAC top:10 fit, cg-maxiter 2)", ["--solver", "pcg", "--cg-maxiter", "2"]))


def make_folders(root):
    """``root/train/<wnid>/*.jpg`` and ``root/orig/<index>/*.jpg``: :data:`TRAIN` and :data:`TEST` noise JPEGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, wnid in enumerate(("n01440764", "n01443537")):
        for folder, count in ((root / "train" / wnid, TRAIN // 2), (root / "orig" / str(i), TEST // 2)):
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k:03d}.jpg", quality=90)


def run(args, say, record, run_script, run_measured):
    """The rows: one peak RSS per Fisher kind against ``BUDGET_GB + MODEL_GB``, and the refusal of ``true``."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        make_folders(tmp)
        ok, *_ = run_script("memory", "prepare_data.py",
                            [sys.executable, str(REPO / "prepare_data.py"), "-tr", str(tmp / "train"), "-ts",
                             str(tmp / "orig"), "-bs", "4", "--out", str(tmp / "data")])
        if not ok:
            return
        base = [sys.executable, str(REPO / "calculate.py"), "--data", str(tmp / "data"), "--model", "vgg16",
                "--weights", "none", "--params", "all", "--memory-budget", str(BUDGET_GB), "-sf", "png"]
        limit = (BUDGET_GB + MODEL_GB) * 1024
        for i, (label, extra) in enumerate(FISHERS[:1] if args.quick else FISHERS):
            out = tmp / f"out{i}"
            say(f"[memory] VGG16 all parameters, {TRAIN} training x {TEST} test images, {label}")
            ok, wall, peak, _, tail = run_script("memory", f"calculate.py {label}", base + extra + ["--out", str(out)])
            if not ok:
                continue
            run_json = json.loads((out / "run.json").read_text())
            info = run_json.get("solver_info") or {}
            fisher = info.get("fisher") or (info.get("preconditioner") or {}).get("fisher", "")
            record("memory", f"VGG16 all, budget {BUDGET_GB} GB, {label}: peak RSS", peak, "MiB", target=limit,
                   op="<=", note=f"solver {run_json.get('solver', '?')}, fisher {fisher}; {wall:.0f} s wall; "
                                 f"target = budget + {MODEL_GB} GiB of model")
        say("[memory] VGG16 all parameters, --solver ekfac --fisher true (1 000 classes: refused)")
        code, wall, _, _, tail = run_measured(base + ["--solver", "ekfac", "--fisher", "true", "--out",
                                                      str(tmp / "out_true")])
        lines = [line for line in tail.strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]     # the log lines before it are not the error
        refused = code == 2 and len(errors) == 1 and lines[-1] == errors[0]
        record("memory", "VGG16 --fisher true: refused in one line, exit 2", float(refused), "",
               target=1, op=">=", note=f"exit {code}, {wall:.0f} s: {lines[-1][:120] if lines else ''}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_memory(args):
    """VGG16 with every parameter at calculate.py's defaults, ``--memory-budget 8``: peak RSS per Fisher kind
    against the budget plus the model's footprint (:func:`run`)."""
    from harness import record, run_measured, run_script, say

    run(args, say, record, run_script, run_measured)
