"""One writer per output folder: an advisory lock on ``<folder>/.lock``.

Two runs writing into one ``--out`` at once would each replace the other's archives with files
built for other settings. :func:`folder_lock` makes the second run stop at once with a one-line
:class:`UserError` naming the first run's pid. The lock is ``fcntl.flock`` on ``<folder>/.lock``
(non-blocking), so the kernel releases it when its holder dies, even by ``kill -9``; a ``.lock``
file left behind by a killed run is simply locked again by the next one.
"""
import contextlib
import fcntl
import os

from influence.errors import SettingError, UserError

LOCK_NAME = ".lock"


def _holder(path):
    """``pid`` written in a lock file (``"?"`` when unreadable: it is being rewritten)."""
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.read(200).split()
    except OSError:
        return "?"
    return first[0] if first and first[0].isdigit() else "?"


@contextlib.contextmanager
def folder_lock(folder, what="prepare_data.py"):
    """Hold the write lock of ``folder`` (an existing folder) for the ``with`` block.

    Raises :class:`UserError` ``"another run (pid N) is writing into <folder>; wait for it or
    use another folder"`` (a :class:`SettingError` about ``out``) when another process holds it. ``what`` (the script's name) is written
    into the lock file with this process's pid, for a person looking at the file. The lock file is
    removed on exit when this run still owns it.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, LOCK_NAME)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot create the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SettingError("out", f"another run (pid {_holder(path)}) is writing into {folder}; "
                                      "wait for it or use another folder") from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder may have removed the file between our open and our flock: then we
        # locked a file nobody else can see. Retry on the file that is there now.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {what}\n".encode())
        yield path
    finally:
        # unlink while still holding the lock, so that no other run can be holding this inode
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                os.unlink(path)
        os.close(fd)
