"""Writing the output files of finished test images, in this thread or in background processes.

Drawing a test image's figures holds the GIL for a tenth of a second or more, so on a run with a cheap
solver the figures, not the arithmetic, would set the pace. :class:`OutputWriter` hands each test
image's files to a pool of processes (``spawn``: the children import only numpy, matplotlib and
:mod:`influence.outputs`, never TensorFlow) and keeps as many of them busy as the measured times call
for (:func:`writers_busy`): while test images are still being scored, enough to write as fast as the
scoring goes, leaving it a core; once nothing is left to score, all of them. Each child reports how long
each test image took it; the caller says how long scoring takes (:meth:`OutputWriter.expect`). A run
with few test images (:data:`MIN_IMAGES`) writes in the calling thread: starting processes would cost
more than it saves.

Results come back in submission order through :meth:`OutputWriter.collect`; an error in a child
(disk full, say) is raised there, in the parent, as the original exception.
"""
import collections
import concurrent.futures
import math
import multiprocessing
import os
import statistics
import time

#: below this many test images the processes' start (half a second each) costs more than it saves
MIN_IMAGES = 12

#: processes at most: each holds matplotlib and its laid-out figures (about 150 MB)
MAX_WORKERS = 4


class Prefetched:
    """A picklable ``fetch_image(global_index)`` over images read beforehand: ``{index: uint8 image}``."""

    def __init__(self, images):
        self.images = dict(images)

    def __call__(self, index):
        return self.images[int(index)]


def cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        return os.cpu_count() or 1


def default_workers(images_to_write, n_cores=None):
    """Processes of the pool: none for a few test images or one core, else one per core, at most
    :data:`MAX_WORKERS` (how many are kept busy is measured: :func:`writers_busy`)."""
    n_cores = cores() if n_cores is None else n_cores
    if images_to_write < MIN_IMAGES or n_cores < 2:
        return 0
    return min(n_cores, MAX_WORKERS)


def writers_busy(write_s, score_s, workers, scoring_left):
    """How many of ``workers`` processes to keep busy.

    Args:
      write_s: seconds a process takes to write one test image's files (measured; None before the first).
      score_s: seconds of scoring per test image (measured; 0 when unknown).
      workers: processes in the pool (>= 1).
      scoring_left: whether test images are still to be scored.

    Returns:
      all ``workers`` when nothing is left to score; else one until a write is measured, then enough
      to write as fast as the scoring goes (``ceil(write_s / score_s)``), leaving the scoring a core
      (at most ``workers - 1``, at least 1).
    """
    if not scoring_left:
        return workers
    if write_s is None or score_s <= 0:
        return 1
    return max(1, min(workers - 1, math.ceil(write_s / score_s)))


_SHARED = {}


def _init(shared):
    _SHARED.clear()
    _SHARED.update(shared)


def _call(fn, args, kwargs):
    """``fn(*args, **shared, **kwargs)`` in a child -> (its result, seconds it took)."""
    t0 = time.perf_counter()
    result = fn(*args, **{**_SHARED, **kwargs})
    return result, time.perf_counter() - t0


class OutputWriter:
    """``submit(tag, fn, *args, **kwargs)`` now or in a child; ``collect()`` -> [(tag, result)] in order.

    ``shared``: keyword arguments every call gets (sent to each child once, not per call: the
    training set's keys, files and labels, an empty figure book that each child fills).
    ``workers``: processes of the pool (0 = write in the calling thread).
    ``warm``: ``warm(**shared)``, run once in each process as the pool starts (import and lay out what the
    writing needs, while the caller still computes); its result is dropped, an error in it raised at
    :meth:`close`.
    """

    def __init__(self, workers=0, shared=None, warm=None):
        self.workers = int(workers)
        self._shared = dict(shared or {})
        self._pool = None
        self._pending = collections.deque()   # [tag, future, result, done]: submission order
        self._waiting = collections.deque()   # entries not handed to a child yet: (entry, fn, args, kwargs)
        self._write_s = []                    # seconds a child took per test image
        self._score_s, self._scoring_left = 0.0, True
        self._warming = []
        if self.workers > 0:
            ctx = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx,
                                                                initializer=_init, initargs=(self._shared,))
            if warm is not None:        # one task per process: each starts one more until all are started
                self._warming = [self._pool.submit(_call, warm, (), {}) for _ in range(self.workers)]

    def expect(self, score_s, scoring_left):
        """``score_s`` seconds of scoring per test image, and whether any are left to score after those
        submitted next: how many children to keep busy (:func:`writers_busy`)."""
        self._score_s, self._scoring_left = float(score_s), bool(scoring_left)
        self._feed()

    def busy(self):
        """Children to keep busy now."""
        write_s = statistics.median(self._write_s) if self._write_s else None
        return writers_busy(write_s, self._score_s, self.workers, self._scoring_left)

    def submit(self, tag, fn, *args, **kwargs):
        if self._pool is None:
            self._pending.append([tag, None, fn(*args, **{**self._shared, **kwargs}), True])
            return
        entry = [tag, None, None, False]
        self._pending.append(entry)
        self._waiting.append((entry, fn, args, kwargs))
        self._feed()

    def _in_flight(self):
        return [e[1] for e in self._pending if e[1] is not None and not e[3]]

    def _settle(self):
        """Take the results of finished children (their times measure the writing)."""
        for entry in self._pending:
            future = entry[1]
            if future is not None and not entry[3] and future.done():
                if future.exception() is None:
                    entry[2], seconds = future.result()
                    self._write_s.append(seconds)
                entry[3] = True

    def _feed(self):
        """Hand waiting test images to children, up to :meth:`busy` at once."""
        if self._pool is None:
            return
        self._settle()
        running = len(self._in_flight())
        while self._waiting and running < self.busy():
            entry, fn, args, kwargs = self._waiting.popleft()
            entry[1] = self._pool.submit(_call, fn, args, kwargs)
            running += 1

    def collect(self, wait=True):
        """The finished results, oldest first; with ``wait=False`` only those already done (in order)."""
        done = []
        self._feed()
        while self._pending:
            entry = self._pending[0]
            if not entry[3]:
                if not wait:
                    break
                flying = self._in_flight()
                concurrent.futures.wait(flying, return_when=concurrent.futures.FIRST_COMPLETED)
                self._feed()
                continue
            if entry[1] is not None and entry[1].exception() is not None:
                raise entry[1].exception()
            self._pending.popleft()
            done.append((entry[0], entry[2]))
        return done

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            for future in self._warming:
                if not future.cancelled() and future.exception() is not None:
                    raise future.exception()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
