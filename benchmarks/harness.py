"""The benchmarks' harness: recording, timing, measuring and reporting, shared by every section.

* :func:`record` / :func:`record_failure` keep one row per measure in :data:`RESULTS` (a section that
  raises, or whose script exits non-zero, is a failure; a measure off its target is only missed);
  :func:`run_section` runs one section, :func:`run_script` one script of it;
* :func:`timeit`: the median of repeated calls after a warm-up (the first call traces the ``tf.function``);
* :func:`run_measured`: a subprocess's wall time and peak RSS (its own and its process tree's, read from
  ``/proc``);
* :func:`machine`: the CPU, core count and library versions the numbers were taken with;
* :func:`table`, :func:`report` and :func:`write_markdown`: the printed table, the summary and exit code,
  and the "Latest results" block of ``BENCHMARKS.md``.

Importing it puts the repository on ``sys.path`` (the sections import ``influence``) and quiets
TensorFlow's C++ log. Sections import from here (``from harness import record, say``); ``run.py``
runs them.
"""
import datetime
import os
import platform
import re
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

RESULTS = []  # dicts: section, name, value, unit, target (str), ok (bool/None), note, failed (bool)
TAIL_LINES = 5  # lines of a failure's error shown under the table


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


def random_vgg16_archives(folder, n_train, n_test, folders=("orig",), seed=0):
    """train.npz (``n_train`` random 224x224 uint8 images, labels in 0..999, archive batches of 32) and test.npz
    (``n_test`` such images in each test folder of ``folders``) under ``folder``: what the VGG16 runs score (their
    costs do not depend on the pixels)."""
    from influence.data.archive_writer import ArchiveWriter

    rng = np.random.default_rng(seed)
    with ArchiveWriter(Path(folder) / "train.npz") as w:
        for b in range(0, n_train, 32):
            m = min(32, n_train - b)
            w.add(f"train_x_{b // 32}", rng.integers(0, 256, (m, 224, 224, 3), dtype=np.uint8))
            w.add(f"train_y_{b // 32}", rng.integers(0, 1000, (m, 1)))
            w.add(f"train_files_{b // 32}", np.array([f"t{b + i}.jpg" for i in range(m)]))
        w.add("meta_size", np.array([224, 224]))
    with ArchiveWriter(Path(folder) / "test.npz") as w:
        for name in folders:
            w.add(f"test_{name}_x", rng.integers(0, 256, (n_test, 224, 224, 3), dtype=np.uint8))
            w.add(f"test_{name}_y", rng.integers(0, 1000, (n_test, 1)))
            w.add(f"test_{name}_files", np.array([(f"q{i}" if name == "orig" else f"{name}{i}") + ".jpg"
                                                  for i in range(n_test)]))
        w.add("meta_size", np.array([224, 224]))


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


# ----------------------------------------------------------------------------- report

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
