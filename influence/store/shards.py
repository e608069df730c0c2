"""The gradient store on disk: every training image's projected gradient, float16, in memory-mapped shards.

Layout (one folder per content key; ``digest``: :func:`key_digest` of the curvature key, so a change of
model weights, parameters, training archive, projection dimension, seed or Fisher names another folder)::

    <cache>/store-<digest>/
      meta.json                 {"digest", "n", "dim", "shard_rows", "dtype": "float16"}
      rows-00000.f16            (rows, D) float16, raw row-major: row i / scale i
      scale-00000.f32           (rows,) float32: each row's largest |value| (1 for a zero row)
      ...
      partial.npz               while writing only: the curvature sum of the shards written so far
      in-use.lock               empty: a process writing or reading the store holds a shared flock on it

Shard ``k`` holds images ``[k·shard_rows, min((k+1)·shard_rows, n))``. Each row is stored divided by its own
largest magnitude, so a confident image whose gradient is 1e-8 keeps float16's relative precision (2⁻¹¹)
instead of underflowing. Size: ``n (2D + 4)`` bytes and meta.json, i.e. at most ``n·D·2`` + 1 % for
D ≥ 200. Every file is written under a temporary name and renamed (:func:`influence.io.atomic_write`): a
shard exists whole or not at all, and an interrupted write resumes from ``partial.npz`` (the shards it
covers are kept; later ones are written again).

Old stores (:func:`prune_stores`): the curvature cache keeps one entry per solver (``store.npz``, one key), and
a fit writes every shard anew, so a whole store of another key is never read again; when a store is finished,
the other whole stores under the same folder are removed, except one a live process holds (its
``in-use.lock``, :meth:`GradientStore.hold`). A partial store (``partial.npz``, or shards missing) is kept:
its pass resumes when its key comes back.
"""
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from influence.io import atomic_write

#: the least rows of a shard (more when D is large: the partial curvature sum, 8 D² bytes, is written
#: once per shard, so a shard holds at least 4 D rows, 8 D² bytes of float16 itself)
MIN_SHARD_ROWS = 1024
DTYPE = np.float16
#: the file a process holding the store has a shared ``flock`` on (:meth:`GradientStore.hold`)
LOCK_NAME = "in-use.lock"

log = logging.getLogger(__name__)


def key_digest(key):
    """24 hex digits of a JSON-able key (sorted)."""
    return hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def shard_rows(n, dim):
    """Rows per shard for ``n`` images of ``dim`` dimensions (see :data:`MIN_SHARD_ROWS`)."""
    return int(max(1, min(n, max(MIN_SHARD_ROWS, 4 * dim))))


def store_bytes(n, dim):
    """Bytes of the rows and scales of ``n`` images at ``dim`` dimensions (meta.json aside)."""
    return int(n) * (2 * int(dim) + 4)


class GradientStore:
    """The store of ``n`` rows of ``dim`` dimensions under ``root/store-<digest>``."""

    def __init__(self, root, digest, n, dim, rows=None):
        self.folder = Path(root) / f"store-{digest}"
        self.digest, self.n, self.dim = str(digest), int(n), int(dim)
        self.rows = int(rows) if rows is not None else shard_rows(self.n, self.dim)
        self.shards = -(-self.n // self.rows) if self.n else 0

    # --- layout ----------------------------------------------------------------------------------
    @property
    def meta(self):
        return {"digest": self.digest, "n": self.n, "dim": self.dim, "shard_rows": self.rows, "dtype": "float16"}

    def bounds(self, k):
        """Images ``(start, stop)`` of shard ``k``."""
        return k * self.rows, min((k + 1) * self.rows, self.n)

    def _rows_path(self, k):
        return self.folder / f"rows-{k:05d}.f16"

    def _scale_path(self, k):
        return self.folder / f"scale-{k:05d}.f32"

    @property
    def _partial_path(self):
        return self.folder / "partial.npz"

    def open_for_writing(self):
        """Create the folder and meta.json; a folder whose meta.json disagrees (another shard size) starts over."""
        meta = self.folder / "meta.json"
        if meta.is_file():
            try:
                same = json.loads(meta.read_text()) == self.meta
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            with atomic_write(meta) as tmp:
                tmp.write_text(json.dumps(self.meta))

    def shard_done(self, k):
        """True when shard ``k`` is on disk whole."""
        start, stop = self.bounds(k)
        rows, scale = self._rows_path(k), self._scale_path(k)
        return (rows.is_file() and scale.is_file() and os.path.getsize(rows) == (stop - start) * self.dim * 2
                and os.path.getsize(scale) == (stop - start) * 4)

    def complete(self):
        """True when meta.json matches and every shard is whole."""
        meta = self.folder / "meta.json"
        try:
            if json.loads(meta.read_text()) != self.meta:
                return False
        except (OSError, ValueError):
            return False
        return all(self.shard_done(k) for k in range(self.shards))

    def nbytes(self):
        """Bytes of every file in the store's folder."""
        return folder_bytes(self.folder)

    def hold(self):
        """An open file with a shared ``flock`` on the store's :data:`LOCK_NAME` (released when it is closed, or
        when the process ends): while it is held, :func:`prune_stores` leaves the store alone."""
        fh = open(self.folder / LOCK_NAME, "a")
        fcntl.flock(fh, fcntl.LOCK_SH)
        return fh

    # --- writing ---------------------------------------------------------------------------------
    def write_shard(self, k, rows):
        """Write shard ``k`` from its float (stop - start, D) rows, scale first, rows last (both atomic)."""
        start, stop = self.bounds(k)
        rows = np.asarray(rows, np.float64)
        if rows.shape != (stop - start, self.dim):
            raise ValueError(f"shard {k}: rows {rows.shape}, expected {(stop - start, self.dim)}")
        scale = np.abs(rows).max(axis=1) if self.dim else np.zeros(len(rows))
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        values = (rows / scale.astype(np.float64)[:, None]).astype(DTYPE)
        with atomic_write(self._scale_path(k)) as tmp:
            scale.tofile(tmp)
        with atomic_write(self._rows_path(k)) as tmp:
            values.tofile(tmp)

    def checkpoint(self):
        """``(sum, shards)``: the partial curvature sum and how many shards it covers, or ``(None, 0)``."""
        path = self._partial_path
        if not path.is_file():
            return None, 0
        try:
            with np.load(path, allow_pickle=False) as npz:
                total, shards = np.array(npz["sum"]), int(npz["shards"])
        except (OSError, ValueError, KeyError, EOFError):
            return None, 0
        if total.shape != (self.dim, self.dim) or not all(self.shard_done(k) for k in range(shards)):
            return None, 0
        return total, shards

    def save_checkpoint(self, total, shards):
        with atomic_write(self._partial_path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, sum=total, shards=np.int64(shards))

    def finish(self):
        """The store is whole: the partial sum goes."""
        self._partial_path.unlink(missing_ok=True)

    # --- reading ---------------------------------------------------------------------------------
    def shard(self, k):
        """``(values, scale)`` of shard ``k``: a read-only float16 memory map (rows, D) and float32 (rows,)."""
        start, stop = self.bounds(k)
        values = np.memmap(self._rows_path(k), dtype=DTYPE, mode="r", shape=(stop - start, self.dim))
        return values, np.fromfile(self._scale_path(k), dtype=np.float32)

    def blocks(self, block_rows=4096):
        """Yields ``(start, rows)``: float32 (≤ block_rows, D) stored rows, scaled back, in image order."""
        for k in range(self.shards):
            start, _ = self.bounds(k)
            values, scale = self.shard(k)
            for s in range(0, len(values), block_rows):
                part = np.asarray(values[s:s + block_rows], np.float32) * scale[s:s + block_rows, None]
                yield start + s, part


def folder_bytes(folder):
    """Bytes of the files in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def whole_store(folder):
    """True when ``folder`` holds a finished store: meta.json readable, every shard whole, no partial sum."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
        store = GradientStore(Path(folder).parent, meta["digest"], meta["n"], meta["dim"], meta["shard_rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return store.folder == Path(folder) and not (store.folder / "partial.npz").exists() and store.complete()


def prune_stores(root, keep):
    """Remove the whole stores under ``root`` but ``store-<keep>`` that no process holds (module docstring); log
    one line of what went and what partial stores stay. Returns ``(removed folder names, bytes freed)``."""
    removed, freed, partial = [], 0, []
    for folder in sorted(Path(root).glob("store-*")):
        if folder.name == f"store-{keep}" or not folder.is_dir():
            continue
        try:
            fh = open(folder / LOCK_NAME, "a")
        except OSError:
            continue
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:             # a live process writes or reads it
                continue
            if not whole_store(folder):
                partial.append(folder_bytes(folder))
                continue
            size = folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder.name)
                freed += size
    if removed or partial:
        log.info("store: removed %d old store folder(s) under %s (%.1f MB%s)%s", len(removed), root, freed / 1e6,
                 ": " + ", ".join(removed) if removed else "",
                 f"; kept {len(partial)} partial one(s) of other settings ({sum(partial) / 1e6:.1f} MB), resumable"
                 if partial else "")
    return removed, freed
