"""Writing an ``.npz`` archive member by member, atomically: :class:`ArchiveWriter` (the format is
:mod:`influence.data.archive_reader`'s docstring; prepare_data.py writes through this)."""
import io
import os
import shutil
import tempfile
import zipfile

import numpy as np

_COPY_CHUNK = 8 << 20


class _Stream:
    """Rows appended to a temporary raw file; on close they become one ``.npy`` zip member."""

    def __init__(self, writer, key, dtype, row_shape):
        self._writer = writer
        self.key = key
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.count = 0
        fd, self._raw_path = tempfile.mkstemp(prefix=f".{key}.", suffix=".raw.partial",
                                              dir=writer.folder)
        self._raw = os.fdopen(fd, "wb")
        self.closed = False

    def append(self, rows):
        """Append ``rows`` of shape ``(n, *row_shape)`` (a single row of ``row_shape`` works too)."""
        rows = np.asarray(rows, dtype=self.dtype)
        if rows.shape == self.row_shape:
            rows = rows[None]
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.key}: rows of shape {rows.shape[1:]}, expected {self.row_shape}")
        self._raw.write(np.ascontiguousarray(rows).tobytes())
        self.count += rows.shape[0]

    def close(self):
        """Write the ``.npy`` header with the final count, then the rows, into the archive."""
        if self.closed:
            return
        self.closed = True
        try:
            self._raw.close()
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                      "shape": (self.count, *self.row_shape)}
            with self._writer._zip.open(self.key + ".npy", "w", force_zip64=True) as member:
                if _needs_v2(header):
                    np.lib.format.write_array_header_2_0(member, header)
                else:
                    np.lib.format.write_array_header_1_0(member, header)
                with open(self._raw_path, "rb") as raw:
                    shutil.copyfileobj(raw, member, _COPY_CHUNK)
        finally:
            self._discard()
            self._writer._streams.discard(self)

    def _discard(self):
        if not self._raw.closed:
            self._raw.close()
        if os.path.exists(self._raw_path):
            os.unlink(self._raw_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.closed = True
            self._discard()
            self._writer._streams.discard(self)
        return False


def _needs_v2(header):
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, header)
        return False
    except ValueError:
        return True


class ArchiveWriter:
    """Write an ``.npz`` archive member by member, atomically.

    The archive is built under a temporary name in the same folder (``.<name>.<pid>.<random>.partial``) and
    renamed to ``path`` only when the ``with`` block ends without an exception; on any exception
    (Ctrl-C included) the temporary file is deleted. Memory does not grow with the data: each
    :meth:`add` writes one array, each :meth:`stream` spools rows through a temporary file.

    >>> with ArchiveWriter("test.npz") as w:
    ...     with w.stream("test_orig_x", np.uint8, (224, 224, 3)) as s:
    ...         s.append(batch)            # (n, 224, 224, 3), any number of times
    ...     w.add("test_orig_y", labels)
    """

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self.folder = os.path.dirname(self.path)
        # unique per writer (pid + random), so two runs never write into one temporary file
        self.tmp_path = os.path.join(
            self.folder, f".{os.path.basename(self.path)}.{os.getpid()}.{os.urandom(4).hex()}.partial")
        self._zip = None
        self._streams = set()
        self._keys = set()

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        self._zip = zipfile.ZipFile(self.tmp_path, "w", zipfile.ZIP_STORED, allowZip64=True)
        return self

    def _check_key(self, key):
        if key in self._keys:
            raise ValueError(f"duplicate archive key {key!r}")
        self._keys.add(key)

    def add(self, key, array):
        """Write a whole array as member ``key`` (no pickles: object arrays are refused)."""
        self._check_key(key)
        array = np.asanyarray(array)
        with self._zip.open(key + ".npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, array, allow_pickle=False)

    def stream(self, key, dtype, row_shape):
        """Open a member written row block by row block; returns an object with ``append(rows)``
        and ``close()`` (also a context manager). The member is finalised when closed."""
        self._check_key(key)
        stream = _Stream(self, key, dtype, row_shape)
        self._streams.add(stream)
        return stream

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                for stream in list(self._streams):
                    stream.close()
                self._zip.close()
                os.replace(self.tmp_path, self.path)
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()
        return False

    def _abort(self):
        for stream in list(self._streams):
            stream.closed = True
            stream._discard()
        self._streams.clear()
        try:
            if self._zip is not None:
                self._zip.close()
        except Exception:
            pass
        if os.path.exists(self.tmp_path):
            os.unlink(self.tmp_path)


__all__ = ["ArchiveWriter"]
