"""The ``.npz`` archive format and its readers: :class:`TrainArchive`, :class:`TestArchive`.

Archives are ordinary numpy ``.npz`` files (uncompressed zip, zip64 allowed), readable with
``np.load(path, allow_pickle=False)``.

``train.npz`` (batches ``b = 0, 1, 2, ...``, all full except the last)::

    train_x_{b}      uint8  (N, H, W, 3)   images
    train_y_{b}      int64  (N, 1)         class index
    train_files_{b}  <U     (N,)           path relative to the train folder
    meta_size        int64  (2,)           [H, W]
    meta_classes     <U16   ()             digest of the class map (ClassMap.digest)

``test.npz`` (one group per test folder, named by the folder's basename)::

    test_{folder}_x      uint8  (N, H, W, 3)
    test_{folder}_y      int64  (N, 1)
    test_{folder}_files  <U     (N,)
    meta_size            int64  (2,)
    meta_classes         <U16   ()      the class map the labels refer to (absent: not known)

A test folder name must be a plain name (no ``/`` or ``\\``, not ``.``, ``..`` or empty): result
folders are named after it, so an archive with any other name is refused when opened.

Archives written by the original tool are read too: no ``_files`` keys (files become ``""``), no
``meta_size`` (shape taken from the first image array), no ``meta_classes`` (no class check),
``y`` of any integer type, and images of any integer type (the original wrote int16) as long as
every value is in 0..255. Such images are converted to uint8 when read, and the range is checked
on what is read (a batch, the rows of :meth:`TrainArchive.take`, a test folder): checking it at
open would mean reading the whole archive. uint8 archives are memory-mapped with no conversion.

The writer is :class:`influence.data.archive_writer.ArchiveWriter`. :class:`TrainBatches` is what a
training set read batch by batch shares, the archive and :class:`influence.data.arrays.TrainSet` alike.
"""
import os
import re
import struct
import zipfile

import numpy as np

from influence.errors import UserError

_TRAIN_KEY = re.compile(r"^train_(x|y|files)_(\d+)$")
_TEST_KEY = re.compile(r"^test_(.+)_(x|y|files)$")


def _open_npz(path, what, hint):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such {what} archive; {hint}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a valid {what} archive ({exc})") from None


def _member_header(npz, key):
    """``(shape, fortran_order, dtype)`` of member ``key`` without reading its data."""
    with npz.zip.open(key + ".npy") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        return np.lib.format.read_array_header_2_0(fh)


def _stored_data_offset(path, info):
    """Byte offset of the ``.npy`` data of a stored (uncompressed) zip member, or ``None``."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(fh)
        else:
            np.lib.format.read_array_header_2_0(fh)
        return fh.tell()


def _files_or_blank(npz, key, n):
    if key in npz.files:
        files = npz[key]
        return files.astype(str)
    return np.full(n, "", dtype="<U1")


def _check_pixel_header(path, key, shape, dtype, fortran):
    """UserError unless member ``key`` is integer images ``(N, H, W, 3)`` in C order."""
    if (len(shape) != 4 or shape[3] != 3 or fortran or not np.issubdtype(dtype, np.integer)
            or dtype.itemsize > 8):
        raise UserError(f"{path}: {key} is {dtype} {shape}, expected uint8 (N, H, W, 3) "
                        "(or int16 as the original tool wrote, values 0..255)")


def as_pixels(x, where):
    """Integer images of any dtype -> uint8, same shape; ``x`` itself when already uint8.

    Raises :class:`UserError` (naming ``where``) when a value lies outside 0..255: such an
    archive does not hold 8-bit images, and wrapping them round would silently change them.
    """
    if x.dtype == np.uint8:
        return x
    if x.size:
        low, high = int(x.min()), int(x.max())
        if low < 0 or high > 255:
            raise UserError(f"{where}: pixel values {low}..{high} are outside 0..255; "
                            "only 8-bit images can be read (run prepare_data.py again)")
    return x.astype(np.uint8)


def is_plain_name(name):
    """True if ``name`` can name one folder: not empty, not ``.`` or ``..``, no ``/``, ``\\`` or NUL."""
    name = str(name)
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _meta_classes(npz, path):
    """The ``meta_classes`` digest of an archive, or ``None`` when it has none."""
    if "meta_classes" not in npz.files:
        return None
    value = npz["meta_classes"]
    if value.dtype.kind != "U" or value.shape != ():
        raise UserError(f"{path}: meta_classes is {value.dtype} {value.shape}, expected a string")
    return str(value)


def _as_labels(y):
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels of dtype {y.dtype}")
    return y.reshape(-1).astype(np.int64)


class TrainBatches:
    """What a training set read batch by batch shares: its size, batch sizes, image keys and random access.

    A subclass sets ``batches`` (batch ids, in order), ``_lengths`` ``{batch id: images}``, ``_starts``
    (int64 (len(batches) + 1,): the first global index of each batch, then the total), ``image_shape``
    and :attr:`input_dtype`, and implements ``labels()`` and ``_rows(b, local)`` (the images of rows
    ``local`` of batch ``b``, as read).
    """

    #: the dtype of the images as read
    input_dtype = np.dtype(np.uint8)

    def __len__(self):
        return int(self._starts[-1])

    def batch_len(self, b):
        """Number of images in batch ``b``."""
        return self._lengths[int(b)]

    def keys(self, b):
        """Image keys ``"{b}_{i}"`` of batch ``b``, in order."""
        b = int(b)
        return [f"{b}_{i}" for i in range(self.batch_len(b))]

    def global_indices(self, indices):
        """``indices`` (any int array; negative ones count from the end) as int64 (k,) in ``[0, len)``;
        IndexError when one is out of range."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        return np.where(indices < 0, indices + n, indices)

    def take(self, indices):
        """Images and labels at global ``indices`` (archive order), in the order given:
        ``(x (k, H, W, C) of input_dtype, y int64 (k,))``. Reads only the batches (rows) they are in."""
        indices = self.global_indices(indices)
        x = np.empty((indices.size, *self.image_shape), self.input_dtype)
        pos = np.searchsorted(self._starts, indices, side="right") - 1
        for p in np.unique(pos):
            sel = np.nonzero(pos == p)[0]
            x[sel] = self._rows(self.batches[int(p)], indices[sel] - self._starts[p])
        return x, self.labels()[indices]


class _NpzArchive:
    """Opening, validating and closing one ``.npz`` archive; subclasses index its members."""

    KIND, HINT = "", ""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._npz = _open_npz(self.path, self.KIND, self.HINT)
        try:
            #: digest of the class map the labels refer to (``meta_classes``), or None
            self.classes_digest = _meta_classes(self._npz, self.path)
            self._index_members()
        except UserError:
            self.close()
            raise
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
            self.close()
            raise UserError(f"{self.path}: not a valid {self.KIND} archive ({exc})") from None

    def _index_members(self):  # pragma: no cover - interface
        raise NotImplementedError

    def fingerprint(self, prefix=""):
        """A hex digest of the archive's contents (not its path or modification time).

        ``prefix``: only the members whose name starts with it (``"test_orig_"``: one test folder).

        Built from every member's name, size and CRC-32 as the zip directory stores them: the
        writer computed each CRC from the member's bytes, so any change of pixels, labels or file
        names changes the digest, and reading it costs nothing however large the archive is.
        """
        import hashlib

        digest = hashlib.sha256()
        for info in sorted(self._npz.zip.infolist(), key=lambda i: i.filename):
            if not info.filename.startswith(prefix):
                continue
            digest.update(f"{info.filename}\0{info.file_size}\0{info.CRC:08x}\n".encode())
        return digest.hexdigest()[:16]

    def close(self):
        """Release the file."""
        if getattr(self, "_npz", None) is not None:
            self._npz.close()
            self._npz = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class TrainArchive(_NpzArchive, TrainBatches):
    """Read-only view of ``train.npz``.

    ``batches``      sorted list of batch ids (ints)
    ``image_shape``  ``(H, W, 3)``
    ``len(a)``       number of images; archive order is batch by batch, ascending ids

    Images are uint8 ``(N, H, W, 3)`` (int16 archives of the original tool are converted on
    read, see the module docstring), labels int64 ``(N,)``, files str ``(N,)`` (paths relative
    to the train folder; ``""`` for archives of the original tool).
    ``classes_digest``: the ``meta_classes`` member, or None.
    """

    KIND, HINT = "train", "run prepare_data.py first"

    def __init__(self, path):
        super().__init__(path)
        self._labels = None
        self._mmap = None
        self._views = None
        self._cache = (None, None)

    def _index_members(self):
        found = {}
        for key in self._npz.files:
            m = _TRAIN_KEY.match(key)
            if m:
                found.setdefault(int(m.group(2)), set()).add(m.group(1))
        batches = sorted(b for b, kinds in found.items() if {"x", "y"} <= kinds)
        if not batches or len(batches) != len(found):
            raise UserError(f"{self.path}: not a valid train archive "
                            "(needs train_x_<b> and train_y_<b> for every batch)")
        self.batches = batches
        lengths = []
        shape = None
        self._dtypes = {}
        for b in batches:
            xshape, fortran, dtype = _member_header(self._npz, f"train_x_{b}")
            yshape, _, ydtype = _member_header(self._npz, f"train_y_{b}")
            _check_pixel_header(self.path, f"train_x_{b}", xshape, dtype, fortran)
            self._dtypes[b] = dtype
            if int(np.prod(yshape)) != xshape[0] or not np.issubdtype(ydtype, np.integer):
                raise UserError(f"{self.path}: train_y_{b} {ydtype} {yshape} does not match "
                                f"train_x_{b} {xshape}")
            if shape is not None and xshape[1:] != shape:
                raise UserError(f"{self.path}: batches have different image sizes")
            shape = xshape[1:]
            lengths.append(xshape[0])
        if "meta_size" in self._npz.files:
            h, w = (int(v) for v in self._npz["meta_size"])
            if (h, w) != tuple(shape[:2]):
                raise UserError(f"{self.path}: meta_size {h}x{w} does not match the images")
        self.image_shape = tuple(int(s) for s in shape)
        self._lengths = {b: n for b, n in zip(batches, lengths)}
        self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._pos = {b: i for i, b in enumerate(batches)}

    # -- whole batches
    def read_batch(self, b):
        """``(x uint8 (N, H, W, 3), y int64 (N,), files str (N,))`` of batch ``b``."""
        b = int(b)
        if b not in self._lengths:
            raise KeyError(f"no batch {b} in {self.path}")
        x = as_pixels(self._npz[f"train_x_{b}"], f"{self.path}: train_x_{b}")
        y = _as_labels(self._npz[f"train_y_{b}"])
        files = _files_or_blank(self._npz, f"train_files_{b}", len(x))
        return x, y, files

    def iter_batches(self):
        """Yield ``(b, x, y, files)`` for every batch, in archive order."""
        for b in self.batches:
            yield (b, *self.read_batch(b))

    def labels(self):
        """All labels, int64 ``(len,)``, in archive order."""
        if self._labels is None:
            parts = [_as_labels(self._npz[f"train_y_{b}"]) for b in self.batches]
            self._labels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._labels

    def files(self):
        """All file paths, str ``(len,)``, in archive order."""
        parts = [_files_or_blank(self._npz, f"train_files_{b}", self.batch_len(b))
                 for b in self.batches]
        return np.concatenate(parts)

    # -- random access
    def _batch_views(self):
        """One memory map of the whole file; a view per stored train_x member (None if not),
        of the member's own dtype (int16 views are converted by the callers, row by row)."""
        if self._views is None:
            views = {}
            infos = {i.filename: i for i in self._npz.zip.infolist()}
            offsets = {b: _stored_data_offset(self.path, infos[f"train_x_{b}.npy"])
                       for b in self.batches}
            if any(o is not None for o in offsets.values()):
                self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
            for b, off in offsets.items():
                if off is None:
                    views[b] = None
                else:
                    views[b] = np.ndarray((self._lengths[b], *self.image_shape), self._dtypes[b],
                                          buffer=self._mmap, offset=off)
            self._views = views
        return self._views

    def _batch_x(self, b):
        view = self._batch_views()[b]
        if view is not None:
            return view
        if self._cache[0] != b:  # compressed member: keep the last batch read
            self._cache = (b, self._npz[f"train_x_{b}"])
        return self._cache[1]

    def _rows(self, b, local):
        """uint8 images of rows ``local`` of batch ``b`` (:meth:`TrainBatches.take`; memory-mapped)."""
        return as_pixels(self._batch_x(b)[local], f"{self.path}: train_x_{b}")

    def lookup(self, key):
        """``(image uint8 (H, W, 3), label int, file str)`` for a key ``"{batch}_{index}"``."""
        try:
            b, i = (int(v) for v in str(key).split("_"))
            if b not in self._lengths or not 0 <= i < self._lengths[b]:
                raise ValueError
        except ValueError:
            raise KeyError(f"no image {key!r} in {self.path}") from None
        image = np.array(as_pixels(self._batch_x(b)[i], f"{self.path}: train_x_{b}"))
        label = int(self.labels()[self._starts[self._pos[b]] + i])
        key_files = f"train_files_{b}"
        file = str(self._npz[key_files][i]) if key_files in self._npz.files else ""
        return image, label, file

    # -- lifetime
    def close(self):
        """Release the file and the memory map."""
        self._views = None
        self._mmap = None
        self._cache = (None, None)
        super().close()

    def __repr__(self):
        return (f"TrainArchive({self.path!r}: {len(self)} images in {len(self.batches)} "
                f"batches, {self.image_shape})")


class TestArchive(_NpzArchive):
    """Read-only view of ``test.npz``.

    ``folders``         test folder names in file order (plain names: checked at open)
    ``image_shape``     ``(H, W, 3)``
    ``classes_digest``  the ``meta_classes`` member, or None
    :meth:`read` returns ``(x uint8 (N, H, W, 3), y int64 (N,), files str (N,))``.
    """

    __test__ = False  # not a pytest test class

    KIND, HINT = "test", "run prepare_data.py or prepare_only_test.py first"

    def _index_members(self):
        folders, kinds = [], {}
        for key in self._npz.files:
            m = _TEST_KEY.match(key)
            if m:
                name = m.group(1)
                if name not in kinds:
                    folders.append(name)
                    kinds[name] = set()
                kinds[name].add(m.group(2))
        bad = [f for f in folders if not {"x", "y"} <= kinds[f]]
        if not folders or bad:
            raise UserError(f"{self.path}: not a valid test archive "
                            "(needs test_<folder>_x and test_<folder>_y)")
        unsafe = [f for f in folders if not is_plain_name(f)]
        if unsafe:
            raise UserError(f"{self.path}: test folder name {unsafe[0]!r} is not a plain folder "
                            "name (no / or \\, not . or ..); refusing this archive")
        shape = None
        for f in folders:
            xshape, fortran, dtype = _member_header(self._npz, f"test_{f}_x")
            _check_pixel_header(self.path, f"test_{f}_x", xshape, dtype, fortran)
            shape = shape or xshape[1:]
        if "meta_size" in self._npz.files:
            shape = (*(int(v) for v in self._npz["meta_size"]), 3)
        self.folders = folders
        self.image_shape = tuple(int(s) for s in shape)

    def _check_folder(self, folder):
        if folder not in self.folders:
            raise UserError(f"no test folder {folder!r} in {self.path}; available: "
                            + ", ".join(self.folders))

    def labels(self, folder):
        """int64 (N,) labels of one test folder, without reading its images."""
        self._check_folder(folder)
        return _as_labels(self._npz[f"test_{folder}_y"])

    def read(self, folder):
        """``(x uint8 (N, H, W, 3), y int64 (N,), files str (N,))`` of one test folder."""
        self._check_folder(folder)
        x = as_pixels(self._npz[f"test_{folder}_x"], f"{self.path}: test_{folder}_x")
        y = _as_labels(self._npz[f"test_{folder}_y"])
        if len(y) != len(x):
            raise UserError(f"{self.path}: test_{folder}_y does not match test_{folder}_x")
        return x, y, _files_or_blank(self._npz, f"test_{folder}_files", len(x))

    def __len__(self):
        return sum(_member_header(self._npz, f"test_{f}_x")[0][0] for f in self.folders)

    def __repr__(self):
        return f"TestArchive({self.path!r}: folders {self.folders}, {self.image_shape})"


def check_same_classes(train, test, classmap=None):
    """Raise :class:`UserError` when the archives' labels refer to different class maps.

    ``train``: a :class:`TrainArchive`; ``test``: a :class:`TestArchive`; ``classmap``: the
    :class:`~influence.data.classes.ClassMap` of ``labels.json``, or None. Compares the
    ``meta_classes`` digests (and ``classmap.digest()``). A side without a digest (archives of the
    original tool or of older versions) is not checked. The message names the command that fixes
    it: ``prepare_only_test.py`` for a stale ``test.npz``, ``prepare_data.py`` when ``train.npz``
    and ``labels.json`` disagree. Returns None.
    """
    out = os.path.dirname(os.path.abspath(test.path))
    wanted = train.classes_digest
    if classmap is not None:
        labels = classmap.digest()
        if wanted is not None and wanted != labels:
            train_out = os.path.dirname(os.path.abspath(train.path))
            raise UserError(f"{train.path} (classes {wanted}) and labels.json (classes {labels}) "
                            f"come from different prepare_data.py runs; run prepare_data.py -tr "
                            f"<train folder> -ts <test folders> --out {train_out} again")
        wanted = labels
    if wanted is not None and test.classes_digest is not None and test.classes_digest != wanted:
        raise UserError(f"{test.path} was packed for other classes (classes {test.classes_digest}) "
                        f"than {train.path} (classes {wanted}): its label numbers mean other "
                        f"classes now; rebuild it with prepare_only_test.py -ts <test folders: "
                        f"{' '.join(test.folders)}> --out {out}")


__all__ = ["TrainArchive", "TestArchive", "TrainBatches", "as_pixels", "check_same_classes", "is_plain_name"]
