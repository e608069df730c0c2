"""influence.progress: tqdm on a terminal, plain rate-limited lines otherwise."""
import io
import logging

import pytest
from tqdm.std import tqdm as std_tqdm

from influence.progress import PlainProgress, progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_progress_rate_limited_with_eta_and_done():
    clock, lines = FakeClock(), []
    bar = PlainProgress(total=100, desc="packing", unit="img", interval=10.0, clock=clock,
                        emit=lines.append)
    assert lines == ["packing: started (100 img)"]
    times = []
    for step in range(1, 81):  # 80 steps of 0.5 s: 40 s in all
        clock.now += 0.5
        bar.update(1)
        if len(lines) > len(times) + 1:
            times.append(clock.now)
    # at most one line per interval: 40 s -> 4 lines, at least 10 s apart
    assert len(lines) == 1 + 4
    assert all(b - a >= 10.0 for a, b in zip(times, times[1:]))
    first = lines[1]  # after 20 steps in 10 s: 2 img/s, 80 left -> 40 s
    assert first.startswith("packing: 20/100 img, 00:10 elapsed")
    assert "2 img/s" in first and "ETA 00:40" in first
    bar.set_postfix(files=7)
    clock.now += 1.0
    bar.close()
    bar.close()  # a second close says nothing more
    assert len(lines) == 6
    assert lines[-1] == "packing: 80/100 img, 00:41 elapsed, done (files=7)"
    assert "ETA" not in lines[-1]


def test_plain_progress_iterates_and_logs(caplog):
    clock = FakeClock()
    with caplog.at_level(logging.INFO, logger="influence.progress"):
        bar = PlainProgress(iter(range(3)), desc="walk", interval=5.0, clock=clock)
        assert list(bar) == [0, 1, 2]
    messages = [r.getMessage() for r in caplog.records if r.name == "influence.progress"]
    assert messages == ["walk: started (? it)", "walk: 3 it, 00:00 elapsed, done"]


def test_progress_picks_plain_lines_off_a_terminal(caplog):
    with caplog.at_level(logging.INFO, logger="influence.progress"):
        stream = io.StringIO()
        bar = progress(range(4), desc="x", unit="img", stream=stream, smoothing=0.1)
        assert isinstance(bar, PlainProgress)
        assert sum(1 for _ in bar) == 4
    assert stream.getvalue() == ""  # plain lines go through logging, never onto the stream
    assert any("x: 4/4 img" in r.getMessage() and "done" in r.getMessage() for r in caplog.records)


def test_progress_is_tqdm_on_a_terminal():
    term = FakeTerminal()
    bar = progress(total=3, desc="y", unit="img", stream=term, mininterval=0)
    assert isinstance(bar, std_tqdm) and not isinstance(bar, PlainProgress)
    bar.update(3)
    bar.close()
    assert "\r" in term.getvalue()  # what a log file must not get
    silent = progress(total=3, stream=io.StringIO(), disable=True)
    assert isinstance(silent, std_tqdm)


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_defaults_to_stderr(monkeypatch, terminal):
    monkeypatch.setattr("sys.stderr", FakeTerminal() if terminal else io.StringIO())
    bar = progress(total=1)
    assert isinstance(bar, PlainProgress) != terminal
    bar.close()


def test_plain_progress_delay_hides_quick_bars_and_shows_slow_ones():
    clock, lines = FakeClock(), []
    quick = PlainProgress(total=3, desc="quick", interval=10.0, clock=clock, emit=lines.append, delay=0.5)
    clock.now += 0.1
    quick.update(3)
    quick.close()
    assert lines == []
    slow = PlainProgress(total=4, desc="slow", interval=10.0, clock=clock, emit=lines.append, delay=0.5)
    clock.now += 1.0
    slow.update(1)
    assert lines == ["slow: 1/4 it, 00:01 elapsed, 1 it/s, ETA 00:03"]
    clock.now += 1.0
    slow.close()
    assert lines[-1] == "slow: 1/4 it, 00:02 elapsed, done"
