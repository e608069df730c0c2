"""The benchmark harness (benchmarks/harness.py, run by benchmarks/run.py, ``make bench``): a failing section
is a failure.

No TensorFlow work: the sections here are a failing subprocess and a raising function.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_run_under_test", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    harness = module.harness  # the recording, running and report that run.py's sections use
    monkeypatch.setattr(harness, "RESULTS", [])
    return harness


FAILING = [sys.executable, "-c",
           "import sys; print('LiSSA: 228/300 it', end='\\r', file=sys.stderr); "
           "print('error: LiSSA diverged at step 229', file=sys.stderr); sys.exit(3)"]


def test_failing_script_fails_the_run(bench, capsys):
    ok, *_ = bench.run_script("calculate", "calculate.py", FAILING)
    assert not ok
    bench.record("demo", "HVP / G", 3.0, "G", 2.5, "<=")          # a missed target, not a failure
    code = bench.report(1.0)
    out = capsys.readouterr().out
    assert code == 1
    assert "| calculate | calculate.py exited with code 3 | n/a |  | **FAILED** | error: LiSSA diverged at step 229 |" in out
    assert "| demo | HVP / G | 3 G | <= 2.5 | **missed** |" in out
    assert "1 measures, 0 on target, 1 missed" in out
    assert "    error: LiSSA diverged at step 229" in out                  # the error's last lines
    assert out.rstrip().splitlines()[-1] == "1 section(s) failed: calculate"


def test_raising_section_is_reported_and_the_next_runs(bench, capsys):
    def broken(args):
        raise ValueError("no demo model")

    ran = []
    assert bench.run_section("vgg16", broken, None) is False
    assert bench.run_section("prepare", lambda args: bench.run_script("prepare", "prepare_data.py", FAILING),
                             None) is False
    assert bench.run_section("calculate", ran.append, "args") is True
    assert ran == ["args"]
    code = bench.report(1.0)
    out = capsys.readouterr().out
    assert code == 1
    assert "ValueError: no demo model" in out
    assert out.rstrip().splitlines()[-1] == "2 section(s) failed: vgg16, prepare"


def test_missed_targets_alone_exit_zero(bench, capsys):
    bench.record("demo", "HVP / G", 3.0, "G", 2.5, "<=")
    bench.record("demo", "G", 1.0, "ms")
    assert bench.run_section("demo", lambda args: None, None) is True
    assert bench.report(1.0) == 0
    out = capsys.readouterr().out
    assert "2 measures, 0 on target, 1 missed" in out
    assert "failed" not in out.lower()
