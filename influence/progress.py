"""Progress bars that read well both on a terminal and in a log file.

On a terminal :func:`progress` is an ordinary tqdm bar. When stderr is not a terminal (``make demo >
log 2>&1``, a batch job), tqdm's carriage-return updates would pile up hundreds per line, so the bar
becomes :class:`PlainProgress`: one plain line when it starts, then at most one line every
``interval`` seconds (with the rate and the ETA), and one line when it ends.

Every module shows progress through this function, never through tqdm directly.
"""
import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("influence.progress")

#: seconds between two plain progress lines when the output is not a terminal
PLAIN_INTERVAL = 30.0


def _is_terminal(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _duration(seconds):
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class PlainProgress:
    """The subset of the tqdm API the package uses, printing plain, rate-limited log lines.

    Args:
      iterable: optional; iterating the object yields its items and counts them.
      total: the number of steps, or None when unknown.
      desc, unit: as in tqdm.
      interval: at most one line per ``interval`` seconds between the first and the last.
      clock: a ``time.monotonic``-like function (tests pass a fake one).
      emit: where lines go (default: the ``influence.progress`` logger at INFO).
    """

    def __init__(self, iterable=None, total=None, desc="", unit="it", interval=PLAIN_INTERVAL,
                 clock=time.monotonic, emit=None, delay=0.0, **_ignored):
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total = total
        self.desc = desc or ""
        self.unit = unit
        self.n = 0
        self.postfix = ""
        self.interval = float(interval)
        self._clock = clock
        self._emit = emit or log.info
        self._start = clock()
        self._last = self._start
        self._closed = False
        # like tqdm's ``delay``: a bar that ends within ``delay`` seconds prints nothing at all
        self._delay = float(delay or 0.0)
        self._shown = False
        if self._delay <= 0:
            self._show(self._line(started=True))

    def _show(self, text):
        self._shown = True
        self._emit(text)

    # --- tqdm-like API --------------------------------------------------------------------------
    def update(self, n=1):
        self.n += n
        now = self._clock()
        if not self._shown and self._delay > 0:
            if now - self._start >= self._delay:
                self._last = now
                self._show(self._line())
            return
        if now - self._last >= self.interval:
            self._last = now
            self._show(self._line())

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self):
        if not self._closed:
            self._closed = True
            if self._shown or self._clock() - self._start >= self._delay:
                self._show(self._line(finished=True))

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --- text -----------------------------------------------------------------------------------
    def _line(self, started=False, finished=False):
        elapsed = self._clock() - self._start
        head = f"{self.desc}: " if self.desc else ""
        if started:
            size = f"{self.total} {self.unit}" if self.total is not None else f"? {self.unit}"
            return f"{head}started ({size})"
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        rate = self.n / elapsed if elapsed > 0 else 0.0
        text = f"{head}{count} {self.unit}, {_duration(elapsed)} elapsed"
        if finished:
            text += ", done"
        else:
            if rate > 0:
                text += f", {rate:.3g} {self.unit}/s"
            if self.total is not None and rate > 0:
                text += f", ETA {_duration((self.total - self.n) / rate)}"
        if self.postfix:
            text += f" ({self.postfix})"
        return text


def progress(iterable=None, *, total=None, desc="", unit="it", leave=False, disable=False, stream=None,
             **kwargs):
    """A tqdm bar on a terminal, a :class:`PlainProgress` otherwise.

    ``disable=True`` gives a silent tqdm (the same object type callers already handle).
    ``stream``: the stream the bar would draw on (default: ``sys.stderr``).
    """
    stream = sys.stderr if stream is None else stream
    if disable or _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, file=stream,
                    **kwargs)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, delay=kwargs.get("delay", 0.0))
