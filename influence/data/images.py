"""Walking image folders, decoding and resizing images with PIL.

Every image becomes ``uint8 (H, W, 3)`` RGB: grayscale, palette, RGBA, CMYK and 16-bit images are
converted (16-bit values are scaled to 8 bits, not clipped) and the result is resized to
``(W, H)``. The resampling filter defaults to nearest neighbour, as the original tool's Keras
``load_img(path, target_size=...)`` did (its ``interpolation="nearest"`` default); ``bilinear``,
``bicubic`` and ``lanczos`` are the other choices (:data:`RESAMPLE`). A file PIL cannot read
(corrupt, truncated, empty, not an image) raises :class:`BadImage`; callers skip it with a warning.
"""
import logging
import multiprocessing
import os
import signal
import time
import warnings

import numpy as np
from PIL import Image

from influence.errors import UserError
from influence.progress import progress

log = logging.getLogger(__name__)

#: ``--resample`` names -> PIL filters; the first is the default (Keras ``load_img``'s)
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_RESAMPLE = "nearest"
#: seconds a folder walk runs before its progress bar appears
PARSE_DELAY = 0.5


class BadImage(Exception):
    """A file that cannot be decoded as an image."""


def default_workers():
    """Number of CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _visible(name):
    return not name.startswith(".")


def require_folder(path, what):
    """Raise :class:`UserError` unless ``path`` is an existing folder."""
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{what} {path!r} is not a folder")


def list_subfolders(root, what="folder"):
    """Sorted names of the visible subfolders of ``root`` (UserError if ``root`` is missing)."""
    require_folder(root, what)
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))


def list_files(root, subfolders, desc="parsing"):
    """All visible files under ``root/<subfolder>`` (recursively), as sorted relative paths.

    Returns a list of ``(subfolder, relative_path)`` pairs, relative to ``root``, sorted by path.
    A progress bar counting subfolders appears only once the walk has taken ``PARSE_DELAY``
    seconds: a quick walk leaves no lines in a log (:class:`~influence.progress.PlainProgress`
    has no ``delay`` of its own).
    """
    found = []
    subfolders = list(subfolders)
    bar = None
    start = time.monotonic()
    try:
        for k, sub in enumerate(subfolders):
            if bar is None and time.monotonic() - start >= PARSE_DELAY:
                bar = progress(total=len(subfolders), desc=desc, unit="folder")
                bar.update(k)
            top = os.path.join(root, sub)
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames if _visible(d))
                for name in filenames:
                    if _visible(name):
                        rel = os.path.relpath(os.path.join(dirpath, name), root)
                        found.append((sub, rel))
            if bar is not None:
                bar.set_postfix(files=len(found), refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    found.sort(key=lambda item: item[1])
    return found


def _to_rgb(img):
    """Convert any PIL mode to RGB; 16/32-bit integer modes are scaled from 0..65535."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "I;32", "F"):
        arr = np.asarray(img)
        if mode == "F":
            arr = np.clip(arr, 0.0, 255.0)
        else:
            arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
        gray = np.rint(arr).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def decode_image(path, size, resample=DEFAULT_RESAMPLE):
    """Read ``path`` and return ``uint8 (H, W, 3)`` with ``size = (H, W)``.

    ``resample``: a :data:`RESAMPLE` name, the filter used when the image is not ``(H, W)``
    already (converted to RGB first, then resized, as Keras ``load_img`` does).
    Raises :class:`BadImage` (with a short reason) for anything PIL cannot read.
    """
    height, width = size
    method = RESAMPLE[resample]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                rgb = _to_rgb(img)
                if rgb.size != (width, height):
                    rgb = rgb.resize((width, height), method)
                arr = np.asarray(rgb, dtype=np.uint8)
    except BadImage:
        raise
    except Exception as exc:  # PIL raises many kinds; KeyboardInterrupt passes through
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.replace(f" {os.fspath(path)!r}", "")
        raise BadImage(reason) from None
    if arr.shape != (height, width, 3):  # pragma: no cover - defensive
        raise BadImage(f"unexpected decoded shape {arr.shape}")
    return arr


def _decode_task(task):
    """Worker entry: ``(path, size, resample)`` -> ``(array or None, error or None)``."""
    path, size, resample = task
    try:
        return decode_image(path, size, resample), None
    except BadImage as exc:
        return None, str(exc)


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Decoder:
    """Decode lists of image paths, in order, in a pool of worker processes (or in-process).

    Use as a context manager; :meth:`decode` yields ``(array or None, error or None)`` per path.
    Workers ignore Ctrl-C: the parent handles it and the pool is terminated on exit.
    ``resample``: a :data:`RESAMPLE` name (default nearest, as the original tool).
    """

    def __init__(self, size, workers=1, resample=DEFAULT_RESAMPLE):
        if resample not in RESAMPLE:
            raise ValueError(f"unknown resampling filter {resample!r}")
        self.resample = resample
        self.size = tuple(size)
        self.workers = max(1, int(workers))
        self._pool = None

    def __enter__(self):
        if self.workers > 1:
            self._pool = multiprocessing.Pool(self.workers, initializer=_ignore_sigint)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
            self._pool = None
        return False

    def decode(self, paths):
        """Yield ``(array, None)`` or ``(None, reason)`` for each path, in order."""
        tasks = [(p, self.size, self.resample) for p in paths]
        if self._pool is None:
            for task in tasks:
                yield _decode_task(task)
            return
        chunk = max(1, min(16, len(tasks) // (self.workers * 4)))
        yield from self._pool.imap(_decode_task, tasks, chunksize=chunk)
