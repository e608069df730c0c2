#!/usr/bin/env python
"""Speed and memory benchmarks of the influence engine (issue 5): ``python benchmarks/run.py``.

Everything runs in one process except the two scripts (``prepare_data.py``, ``calculate.py``),
which run as subprocesses so their peak memory can be read. Timings are medians of repeated
calls after a warm-up (the first call traces the ``tf.function``). Units:

  F  = one forward pass of the batch (``Derivatives.losses``, compiled)
  G  = one gradient step on the same batch (``Derivatives.gradient``: forward + backward)

Sections (``--only NAME``, repeatable), in the order they run: ``demo`` (the demo CNN, batch 256), ``vgg16``
(VGG16, random weights, batch 4 at 224x224, ``--params last:3`` and ``all``), ``prepare`` (``prepare_data.py`` vs
bare PIL, peak RSS at 1 000 and 10 000 images), ``calculate`` (end to end on the demo data), ``krylov`` (its fit,
dpcg against cg), ``truth`` (LDS per compute from ``docs/lds*.json``), ``outputs`` (writing a test image's files),
``memory`` (VGG16 with every parameter at the defaults, ``--memory-budget 8``: peak RSS per Fisher kind against
the budget), ``store`` (the gradient store on the demo CNN) and ``store-vgg16`` (the store against EK-FAC on VGG16
with every parameter, 64 x 40 images: about 80 min on 2 cores). The table is printed and written to ``BENCHMARKS.md`` (the
"Findings" part of that file is kept; use ``--no-write`` to leave the file alone).

A section that raises, or whose script exits non-zero, is a failure, not a missed target: it shows
as FAILED in the table with the last lines of its error, and the run exits 1 ("N section(s) failed:
..."). A measure off its target is "missed" and leaves the exit code at 0.

Timings are never asserted in the test suite: this script only measures and reports.
"""
import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by its path (the tests), not run as a script from here
    sys.path.append(str(HERE))

import harness  # noqa: E402, F401  (first: TensorFlow's log level, the repository on sys.path; tests reach RESULTS)
from harness import REPO, failed_sections, machine, report, run_section, say, write_markdown  # noqa: E402

import end_to_end  # noqa: E402
import engine  # noqa: E402
import krylov  # noqa: E402
import memory  # noqa: E402
import outputs  # noqa: E402
import prepare  # noqa: E402
import store  # noqa: E402
import store_vgg16  # noqa: E402
import truth  # noqa: E402

#: every section in the order it runs (``--only NAME`` picks some): the function that measures it, in its module
BENCHES = {
    "demo": engine.bench_demo,               # the demo CNN's per-batch costs (benchmarks/engine.py)
    "vgg16": engine.bench_vgg16,             # VGG16's, last:3 and all (benchmarks/engine.py)
    "prepare": prepare.bench_prepare,        # prepare_data.py vs bare PIL (benchmarks/prepare.py)
    "calculate": end_to_end.bench_calculate,  # calculate.py end to end on the demo (benchmarks/end_to_end.py)
    "krylov": krylov.bench_krylov,           # the krylov fit, dpcg vs cg (benchmarks/krylov.py)
    "truth": truth.bench_truth,              # LDS per compute from docs/lds*.json (benchmarks/truth.py)
    "outputs": outputs.bench_outputs,        # writing a test image's files (benchmarks/outputs.py)
    "memory": memory.bench_memory,           # VGG16 all at --memory-budget 8 (benchmarks/memory.py)
    "store": store.bench_store,              # the gradient store (benchmarks/store.py)
    "store-vgg16": store_vgg16.bench_store_vgg16,  # the store against EK-FAC on VGG16 (benchmarks/store_vgg16.py)
}
SECTIONS = tuple(BENCHES)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats, VGG16 last:3 only, shorter calculate run")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    p.add_argument("-b", "--bsize", type=int, default=32, help="LiSSA minibatch of the demo (default: 32, as the demo)")
    p.add_argument("--vgg16-images", metavar="TRAIN,TEST",
                   help="store-vgg16: training images and images per test folder (default 64,40; --quick 8,2)")
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
            run_section(name, BENCHES[name], args)
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
