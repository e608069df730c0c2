"""``run.json``: what a calculate run records, and the resume check that reads it back.

A run into an ``--out`` folder that already holds results must agree with them: same math settings
(:data:`influence.settings.MATH_SETTINGS`, each compared as run.json records it:
:func:`influence.settings.same_setting`), same training archive, same images in every test folder
that has results (:func:`check_resume`, from the content fingerprints of :func:`data_fingerprints`).
:class:`RunRecord` writes every setting, the versions, solver facts, timings and peak memory.
"""
import json
import platform
import time
from pathlib import Path

import numpy as np

from influence import __version__
from influence.errors import SettingError
from influence.io import atomic_write
from influence.settings import MATH_SETTINGS, bytes_to_gb, same_setting

RUN_FILE = "run.json"


def data_fingerprints(train, test, folders, previous=None):
    """Content fingerprints: ``{"train": hex, "test": {folder: hex}}`` (see TrainArchive.fingerprint).

    Only ``folders`` (this run's) are fingerprinted anew; the other folders keep the digests in
    ``previous`` (an earlier run.json's), which describe the results they hold.
    """
    tests = dict((previous or {}).get("test", {}))
    tests.update({f: test.fingerprint(prefix=f"test_{f}_") for f in folders})
    return {"train": train.fingerprint(), "test": tests}


def previous_run(out):
    """The ``run.json`` of an earlier run into ``out`` as a dict, or None."""
    path = Path(out) / RUN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError):
        return None


_ELSEWHERE = "use another out folder, or set overwrite to redo them"


def check_resume(out, settings, fingerprints=None, resolved=None):
    """Refuse to mix results of other math settings or other archives in one output folder.

    ``fingerprints``: :func:`data_fingerprints` of this run. The training archive must be the
    same; a test folder that already has results must be the same (new folders are fine).
    ``resolved``: ``{fact: (value, what a run that did not record it used)}``, what this run's solver resolved from
    its ``auto`` settings and that changes the numbers (the store's dimension and structure:
    ``solver.resolved_facts()``), compared with the earlier run's ``solver_info``.
    Errors are :class:`SettingError` of the ``out`` setting.
    """
    old_run = previous_run(out)
    if settings.overwrite or old_run is None or not any(Path(out).rglob("*_scores.npy")):
        return
    old = old_run.get("settings", {})
    mine = settings.recorded()
    diff = [k for k in MATH_SETTINGS if k in old and not same_setting(k, old[k], mine[k])]
    if diff:
        changes = ", ".join(f"{k} {old[k]} -> {mine[k]}" for k in diff)
        raise SettingError("out", f"{out} holds results computed with other settings ({changes}): {_ELSEWHERE}")
    info = old_run.get("solver_info")
    if resolved and info and info.get("solver", mine.get("solver")) == mine.get("solver"):
        facts = {k: (info.get(k, before), value) for k, (value, before) in resolved.items()}
        changed = [f"{k} {was} -> {now}" for k, (was, now) in facts.items() if was is not None and was != now]
        if changed:
            raise SettingError("out", f"{out} holds results computed with other settings ({', '.join(changed)}, "
                                      f"resolved from auto): {_ELSEWHERE}")
    old_fp = old_run.get("fingerprints")
    if not fingerprints or not old_fp:
        return
    if old_fp.get("train") != fingerprints["train"]:
        raise SettingError("out", f"{out} holds results computed on another training archive (train.npz changed: "
                                  f"{old_fp.get('train')} -> {fingerprints['train']}): {_ELSEWHERE}")
    for folder, digest in fingerprints["test"].items():
        before = old_fp.get("test", {}).get(folder)
        if before is not None and before != digest and (Path(out) / folder).is_dir():
            raise SettingError("out", f"{out} holds results for test folder {folder} computed on other test "
                                      f"images (test.npz changed: {before} -> {digest}): {_ELSEWHERE}")


def peak_rss_bytes():
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` without /proc), or 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0


class RunRecord:
    """run.json: every setting, versions, solver facts (λ_max, scale) and timings."""

    def __init__(self, out, settings):
        import keras
        import tensorflow as tf

        self.path = Path(out) / RUN_FILE
        self.data = {
            "settings": settings.recorded(),
            "versions": {"influence": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
                         "numpy": np.__version__, "python": platform.python_version()},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "status": "running",
            "timings": {},
            "counts": {"test_images_done": 0, "test_images_skipped": 0},
        }

    def add_time(self, key, seconds):
        """Add ``seconds`` to phase ``key``; ``peak_rss_gib[key]`` is this process's peak RSS so far."""
        self.data["timings"][key] = round(self.data["timings"].get(key, 0.0) + seconds, 4)
        peak = peak_rss_bytes()
        if peak:
            self.data.setdefault("peak_rss_gib", {})[key] = round(bytes_to_gb(peak), 3)

    def save(self, **extra):
        self.data.update(extra)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as tmp:
            Path(tmp).write_text(json.dumps(self.data, indent=2, default=str))
