"""File writing that every layer may use: nothing half-written ever has a final name.

:func:`atomic_write` writes to a temporary name in the same folder and renames; a crash or an error
leaves the final path as it was, so resuming a run is checking that files exist.
"""
import contextlib
import os
import pathlib


@contextlib.contextmanager
def atomic_write(path):
    """Write ``path`` atomically: yield a temporary path in the same folder, then ``os.replace``.

    The temporary name is ``.<stem>.tmp-<pid><suffix>`` (the extension is kept, so writers that
    pick or append an extension -- matplotlib, ``np.save`` -- write exactly there). The body must
    create and close the file at the yielded path. On an exception in the body the temporary file
    is deleted and the exception propagates; the final path is left untouched.

    Example::

        with atomic_write(out / "a.csv") as tmp:
            tmp.write_text("x\\n")
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync(path):
    """Flush a closed file's data to disk, so the rename never exposes an empty file after a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
