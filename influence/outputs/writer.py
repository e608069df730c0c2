"""Writing the output files of finished test images in background processes.

Drawing a figure with matplotlib costs about half a second and holds the GIL, so on a run with a
cheap solver (EK-FAC on the demo) drawing, not arithmetic, would set the pace. :class:`OutputWriter`
hands each test image's files to a small pool of processes (``spawn``: the children import only
numpy, matplotlib and :mod:`influence.outputs.report`, never TensorFlow), so figures are drawn while the
next group is scored and on every core. With ``workers=0`` it writes in the calling thread.

Results come back in submission order through :meth:`OutputWriter.collect`; an error in a child
(disk full, say) is raised there, in the parent, as the original exception.
"""
import concurrent.futures
import multiprocessing
import os


class Prefetched:
    """A picklable ``fetch_image(global_index)`` over images read beforehand: ``{index: uint8 image}``."""

    def __init__(self, images):
        self.images = dict(images)

    def __call__(self, index):
        return self.images[int(index)]


#: below this many test images the processes' start (a second or two each) costs more than it saves
MIN_IMAGES = 12


def default_workers(images_to_write):
    """Processes worth starting: none for a few images, else up to 4 (one per core)."""
    if images_to_write < MIN_IMAGES:
        return 0
    return max(1, min(4, os.cpu_count() or 1))


_SHARED = {}


def _init(shared):
    _SHARED.clear()
    _SHARED.update(shared)


def _call(fn, args, kwargs):
    return fn(*args, **{**_SHARED, **kwargs})


class OutputWriter:
    """``submit(tag, fn, *args, **kwargs)`` now or in a child; ``collect()`` -> [(tag, result)] in order.

    ``shared``: keyword arguments every call gets (sent to each child once, not per call: the
    training set's keys, files and labels).
    """

    def __init__(self, workers=0, shared=None):
        self.workers = int(workers)
        self._shared = dict(shared or {})
        self._pool = None
        self._pending = []           # (tag, future or result)
        if self.workers > 0:
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                                                initializer=_init, initargs=(self._shared,))

    def submit(self, tag, fn, *args, **kwargs):
        if self._pool is None:
            self._pending.append((tag, fn(*args, **{**self._shared, **kwargs})))
        else:
            self._pending.append((tag, self._pool.submit(_call, fn, args, kwargs)))

    def collect(self, wait=True):
        """The finished results, oldest first; with ``wait=False`` only those already done (in order)."""
        done = []
        while self._pending:
            tag, item = self._pending[0]
            if isinstance(item, concurrent.futures.Future):
                if not wait and not item.done():
                    break
                item = item.result()
            self._pending.pop(0)
            done.append((tag, item))
        return done

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
