"""The curvature cache: training-set work done once, reused by every later run.

A solver's fitted state (EK-FAC factors, eigenbases and eigenvalues; the LiSSA auto scale; the
exact solver's Hessian) is saved as ``<cache>/<cache_name>.npz`` together with the key it was
fitted under: fingerprints of the model weights, ``--params``, the training archive's contents,
the loss, and the solver's own settings (:meth:`InverseHVP.cache_key`). A run whose key matches
loads the state and says so; any mismatch refits and says which part changed. Files are written
atomically, and a file that cannot be read is refitted, never trusted.
"""
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from influence.io import atomic_write

log = logging.getLogger(__name__)

_KEY = "__key__"
_INFO = "__info__"
#: bump when the meaning of a cached state changes
FORMAT = 1


def model_fingerprint(model):
    """Hex digest of every weight of a Keras model (names, shapes, dtypes and values)."""
    digest = hashlib.blake2b(digest_size=16)
    for w in model.weights:
        value = np.ascontiguousarray(np.asarray(w.numpy()))
        digest.update(f"{w.path}|{value.shape}|{value.dtype}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def curvature_key(clf, train, *, model, preprocess, solver):
    """The full key of ``solver``'s state: what the curvature of ``mean L + Ω`` depends on."""
    key = {
        "format": FORMAT,
        "solver": solver.cache_name,
        "model": str(model),
        "weights": model_fingerprint(clf.model),
        "params": [v.path for v in clf.variables],
        "dtype": str(clf.dtype.name),
        "preprocess": str(preprocess),
        "train": train.fingerprint(),
        "train_images": len(train),
        "loss": "softmax cross-entropy from logits + Keras weight regularisers",
    }
    key.update({k: _plain(v) for k, v in solver.cache_key().items()})
    return key


def _plain(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


_WHAT = {"weights": "the model weights", "train": "the training archive", "train_images": "the training archive",
         "params": "params", "model": "model", "preprocess": "preprocess", "dtype": "the model dtype"}


def _describe(changed):
    names = []
    for k in changed:
        text = _WHAT.get(k, k)
        if text not in names:
            names.append(text)
    return ", ".join(names)


class CurvatureCache:
    """``load(solver, key) -> bool`` and ``save(solver, key)`` under one folder."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def path(self, solver):
        return self.folder / f"{solver.cache_name}.npz"

    def load(self, solver, key):
        """Give ``solver`` its cached state when the stored key equals ``key``; True if it did."""
        path = self.path(solver)
        if not path.is_file():
            log.info("curvature cache: nothing cached for %s in %s: fitting", solver.cache_name, self.folder)
            return False
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored = json.loads(bytes(npz[_KEY]).decode())
                changed = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
                if changed:
                    log.info("curvature cache: %s changed since %s was fitted: refitting", _describe(changed), path)
                    return False
                arrays = {k: npz[k] for k in npz.files if k not in (_KEY, _INFO)}
            solver.load_state(arrays)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            log.warning("curvature cache: %s is unreadable (%s): refitting", path, str(exc).splitlines()[0][:200])
            return False
        log.info("curvature cache: loaded %s (%s, fitted on the same model and training archive)",
                 path, solver.cache_name)
        return True

    def load_or_fit(self, solver, key, fit=None):
        """Load ``solver``'s state (:meth:`load`), or run ``fit()`` (default ``solver.fit``) and
        :meth:`save` the result. Returns True when it was loaded."""
        if self.load(solver, key):
            return True
        (fit or solver.fit)()
        self.save(solver, key)
        return False

    def save(self, solver, key):
        """Write ``solver.state()`` with ``key`` (atomically); nothing when the solver learnt nothing."""
        state = solver.state()
        if state is None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(solver)
        arrays = {k: np.asarray(v) for k, v in state.items()}
        arrays[_KEY] = np.frombuffer(json.dumps(key, sort_keys=True).encode(), np.uint8)
        info = {k: v for k, v in solver.info.items() if k != "iterations"}
        arrays[_INFO] = np.frombuffer(json.dumps(info, default=str).encode(), np.uint8)
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        size = os.path.getsize(path)
        log.info("curvature cache: saved %s (%.1f MB)", path, size / 2**20)
        return path
