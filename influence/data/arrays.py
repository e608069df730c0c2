"""Data as a notebook user has it: in-memory arrays, float or uint8 images, any batched training set.

**Two kinds of input.** The derivatives take images in one dtype, the training set's
(:class:`influence.model.derivatives.Derivatives`, ``float_input``):

* **uint8 pixels** 0..255, what the archives hold, and the model's ``preprocess`` maps them to its inputs
  (the compact path: 1 byte a value, calculate.py's). :func:`user_pixels` takes images as the user has them
  and returns those levels:

  * uint8: as they are;
  * float (or another integer type), with ``preprocess="unit"`` (the model reads ``x / 255``): values
    in 0..1, each a level ``k / 255`` (``uint8 / 255.0`` is);
  * float with any other ``preprocess`` (``caffe``, ``tf``, ``torch``, an application's ``auto``, or
    ``none`` with uint8 training images: the model's preprocessing starts from 0..255): values in 0..255,
    each a whole number.

  Anything else is refused with one line naming the argument (a value between two levels has no
  uint8 pixel, so it could not give the numbers the same image gives from an archive).

* **float arrays the model eats as they are**: with ``preprocess="none"`` (also ``auto`` on a model file or
  object, which is ``none``) and float training images, every image is cast to the model's dtype and taken
  as it is, any finite values -- normalised (``(x / 255 - mean) / std``, negative values), augmented, or
  anything else (:func:`user_floats`). The derivatives then take float input end to end (test gradients,
  the training objective's products, every curvature fit, the scorer, self-influence). The training set
  decides: float training images with preprocess ``none`` (for a batch source: its batch 0) make the float
  path, and test images are then cast likewise (uint8 test images too, read as the values 0..255).

Why float with another ``preprocess`` keeps the pixel rule rather than taking floats in 0..255 through the
preprocess: the preprocess modes are defined on pixels, so the pixel rule keeps the numbers of the same image
read from an archive (calculate.py's), and it refuses the common mistake of scaling twice (``x / 255`` fed to a
``unit`` model) instead of scoring silently wrong inputs; floats that are not pixels are already the model's
input, and preprocess ``none`` says so.

**Training sets.** Fitting and scoring read a training set through a small protocol, the one of a
``keras.utils.PyDataset`` / ``Sequence``: ``len(data)`` is the number of batches and ``data[b]`` is
batch ``b`` as ``(x, y)`` (images as above, integer labels ``(n,)`` or ``(n, 1)``); every call must
give the same batch. :class:`ArrayTrainSet` is that protocol over in-memory arrays; a training
archive (``train.npz``) is read directly. :class:`TrainSet` adapts the protocol to what fitting and
scoring call (the reading interface of :class:`influence.data.archive_reader.TrainArchive`).
"""
import hashlib

import numpy as np

from influence.data.archive_reader import TrainBatches
from influence.errors import UserError

#: how far a float pixel may lie from its level (in levels) and still be that level
LEVEL_TOLERANCE = 1e-3


def user_pixels(x, unit, what="images"):
    """uint8 pixel levels of images ``x`` (the rule in the module docstring); ``unit``: the model's
    preprocess is ``unit`` (it reads ``x / 255``); ``what``: the argument the error names."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"{what}: images must be uint8 or float pixels, got {x.dtype}")
    if x.size == 0:
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise UserError(f"{what}: integer pixels must be 0..255, got {lo}..{hi}")
        return x.astype(np.uint8)
    xf = x.astype(np.float64)
    if not np.isfinite(xf).all():
        raise UserError(f"{what}: images hold NaN or infinite values")
    lo, hi = float(xf.min()), float(xf.max())
    top = 1.0 if unit else 255.0
    if lo < -LEVEL_TOLERANCE / 255 * top or hi > top * (1 + LEVEL_TOLERANCE / 255):
        hint = (" (preprocess 'unit' reads float images as 0..1: pass images / 255, or uint8)" if unit
                else " (values in 0..1 are read as pixels 0..255 here: give preprocess='unit', or images * 255)"
                if hi <= 1 else "")
        raise UserError(f"{what}: float values {lo:g}..{hi:g} outside 0..{top:g}{hint}")
    levels = xf * 255.0 if unit else xf
    rounded = np.rint(levels)
    off = float(np.abs(levels - rounded).max())
    if off > LEVEL_TOLERANCE:
        hint = " (values within 0..1: did you mean preprocess='unit'?)" if not unit and hi <= 1 else ""
        raise UserError(f"{what}: float values must be whole pixel levels ({'k / 255' if unit else '0, 1, .., 255'}"
                        f"; some lie {off:.3g} of a level away): the model reads uint8 pixels{hint}")
    return np.clip(rounded, 0, 255).astype(np.uint8)


def user_floats(x, dtype, what="images"):
    """Images as the model eats them (preprocess ``none``, the float path of the module docstring) ->
    ``dtype`` (the model's float dtype), same shape: any finite values; integer images are cast as they are.
    A NaN, an infinite value (or one the cast overflows) or a dtype that is not a number is refused with one
    line naming ``what``."""
    x = np.asarray(x)
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise UserError(f"{what}: images must be float (or integer) arrays, got {x.dtype}")
    with np.errstate(over="ignore"):
        out = x.astype(dtype, copy=False)
    if out.size and not np.isfinite(out).all():
        bad = "NaN or infinite values" if not np.isfinite(x).all() else f"values beyond {np.dtype(dtype).name}'s range"
        raise UserError(f"{what}: images hold {bad}")
    return out


def user_images(x, float_dtype, unit, what="images"):
    """Images as the derivatives take them: :func:`user_floats` in ``float_dtype`` (the float path) or, with
    ``float_dtype`` None, :func:`user_pixels` (``unit``: preprocess ``unit``)."""
    if float_dtype is not None:
        return user_floats(x, float_dtype, what)
    return user_pixels(x, unit, what)


def as_labels(y, what="labels"):
    """int64 ``(n,)`` class indices from ``(n,)`` or ``(n, 1)`` integer labels."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise UserError(f"{what}: must be integer class indices (n,), got {y.dtype} {y.shape}"
                        f"{' (one-hot? pass y.argmax(axis=1))' if y.ndim == 2 else ''}")
    return y.astype(np.int64)


class ArrayTrainSet:
    """In-memory training images and labels as the batch protocol: ``len()`` batches of
    ``batch_size``, ``data[b] -> (x, y)``. ``x``: (N, H, W, C) uint8 or float (the module docstring);
    ``y``: (N,) or (N, 1) integer labels. ``rows(indices)`` reads any images at once."""

    def __init__(self, x, y, batch_size=256):
        self.x, self.y = np.asarray(x), np.asarray(y)
        if self.x.ndim != 4:
            raise UserError(f"train: images must be (N, H, W, C), got {self.x.shape}")
        if len(self.y) != len(self.x):
            raise UserError(f"train: {len(self.y)} labels for {len(self.x)} images")
        if len(self.x) == 0:
            raise UserError("train: no training images")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"train: batch_size must be at least 1, got {batch_size}")

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, b):
        b = int(b)
        if not 0 <= b < len(self):
            raise IndexError(b)
        s = slice(b * self.batch_size, (b + 1) * self.batch_size)
        return self.x[s], self.y[s]

    def rows(self, indices):
        return self.x[indices], self.y[indices]


def is_batched(data):
    """True for an object of the batch protocol (``len`` and indexing) that is not an array."""
    return (hasattr(data, "__len__") and hasattr(data, "__getitem__")
            and not isinstance(data, (np.ndarray, str, bytes, tuple, list)))


class TrainSet(TrainBatches):
    """A training set of the batch protocol, read as fitting and scoring read a ``TrainArchive``
    (``batches``, ``batch_len``, ``read_batch``, ``take``, ``labels``, ``files``, ``keys``,
    ``image_shape``, ``fingerprint``, ``len`` in images).

    Opening reads every batch once: the batch sizes, labels, image shape and a digest of the images
    (the curvature cache's key). ``float_dtype``: the model's float dtype when it takes float arrays as they
    are (preprocess ``none``), else None; then a float batch 0 makes every image be read by
    :func:`user_floats` in that dtype (:attr:`float_dtype` set, :attr:`input_dtype` that dtype), else by
    :func:`user_pixels` (``unit``: the model's preprocess is ``unit``; :attr:`input_dtype` uint8), on every
    read; the last batch read is kept.
    """

    def __init__(self, data, unit, name=None, float_dtype=None):
        self.data, self.unit = data, bool(unit)
        self.path = name or f"<{type(data).__name__}>"
        self.classes_digest = None
        self._float_offered = None if float_dtype is None else np.dtype(float_dtype)
        self.float_dtype = None
        n_batches = len(data)
        if n_batches < 1:
            raise UserError("train: no training batches")
        self.batches = list(range(n_batches))
        digest, lengths, labels, shape = hashlib.sha256(), [], [], None
        for b in self.batches:
            x, y = self._read(b, first=b == 0)
            if shape is not None and x.shape[1:] != shape:
                raise UserError(f"train: batch {b} holds {x.shape[1:]} images, batch 0 {shape}")
            shape = x.shape[1:]
            digest.update(np.ascontiguousarray(x).tobytes())
            digest.update(y.tobytes())
            lengths.append(len(y))
            labels.append(y)
        if len(shape) != 3:
            raise UserError(f"train: images must be (n, H, W, C) per batch, got {shape}")
        self.image_shape = tuple(int(s) for s in shape)
        self._fingerprint = digest.hexdigest()[:16]
        self._lengths = lengths
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._labels = np.concatenate(labels)

    @property
    def input_dtype(self):
        """The images' dtype as read: uint8 pixels, or the model's float dtype (the float path)."""
        return np.dtype(np.uint8) if self.float_dtype is None else self.float_dtype

    def _images(self, x):
        try:
            return user_images(x, self.float_dtype, self.unit, "train")
        except UserError as exc:
            if self._float_offered is None or self.float_dtype is not None:
                raise
            raise UserError(f"{exc} (batch 0 holds integer images, so every training image is read as a uint8 "
                            f"pixel; float batches throughout are taken as the model's input)") from None

    def _read(self, b, first=False):
        x, y = self.data[b][:2]
        if first and self._float_offered is not None and np.issubdtype(np.asarray(x).dtype, np.floating):
            self.float_dtype = self._float_offered
        x = self._images(x)
        y = as_labels(y, "train labels")
        if x.ndim != 4 or len(x) != len(y):
            raise UserError(f"train: batch {b} gives images {x.shape} and {len(y)} labels")
        self._last = (b, x, y)
        return x, y

    def read_batch(self, b):
        b = int(b)
        last = getattr(self, "_last", None)
        x, y = (last[1], last[2]) if last is not None and last[0] == b else self._read(b)
        return x, y, np.full(len(y), "", dtype="<U1")

    def labels(self):
        return self._labels

    def files(self):
        return np.full(len(self), "", dtype="<U1")

    def take(self, indices):
        """Images and labels at global ``indices``, in the order given: the source's own ``rows(indices)``
        when it has one, else the batches they are in (:meth:`TrainBatches.take`)."""
        rows = getattr(self.data, "rows", None)
        if rows is None:
            return super().take(indices)
        indices = self.global_indices(indices)
        x, _ = rows(indices)
        return self._images(x), self._labels[indices]

    def _rows(self, b, local):
        """Images of rows ``local`` of batch ``b``, as read (:meth:`TrainBatches.take`)."""
        return self.read_batch(b)[0][local]

    def fingerprint(self, prefix=""):
        """A digest of the images as read (pixels, or floats in the model's dtype) and labels (what the
        curvature cache's key takes of the data)."""
        return self._fingerprint

    def close(self):
        pass

    def __repr__(self):
        return (f"TrainSet({self.path}: {len(self)} images in {len(self.batches)} batches, {self.image_shape} "
                f"{self.input_dtype.name})")
