"""influence.outputs.writer: the same results in the calling thread and in background processes, and as
many busy processes as the measured times call for."""
import pytest

from influence.outputs.writer import MAX_WORKERS, MIN_IMAGES, OutputWriter, Prefetched, default_workers, writers_busy


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_results_come_back_in_order_with_the_shared_arguments(workers):
    with OutputWriter(workers, shared={"a": 1}) as writer:
        writer.expect(score_s=0.01, scoring_left=True)
        for i in range(3):
            writer.submit(i, dict, b=i)
        writer.expect(score_s=0.01, scoring_left=False)
        assert writer.collect() == [(0, {"a": 1, "b": 0}), (1, {"a": 1, "b": 1}), (2, {"a": 1, "b": 2})]
        with pytest.raises(ValueError):     # at once in the thread; from the child at collect()
            writer.submit("bad", dict, "not a mapping")
            writer.collect()


def test_prefetched_images():
    fetch = Prefetched({3: "img3"})
    assert fetch(3) == "img3" and fetch(3.0) == "img3"


def test_pool_size_and_busy_processes_follow_the_measured_times():
    assert default_workers(MIN_IMAGES - 1, n_cores=8) == 0 and default_workers(100, n_cores=1) == 0
    assert default_workers(100, n_cores=2) == 2 and default_workers(100, n_cores=64) == MAX_WORKERS
    # while scoring goes on: one until a write is measured, then as many as keep up, one core left to it
    assert writers_busy(None, 0.05, workers=4, scoring_left=True) == 1
    assert writers_busy(0.2, 0.1, workers=4, scoring_left=True) == 2
    assert writers_busy(0.2, 0.01, workers=4, scoring_left=True) == 3
    assert writers_busy(0.01, 1.0, workers=4, scoring_left=True) == 1
    assert writers_busy(0.2, 0.01, workers=2, scoring_left=True) == 1
    # nothing left to score: all of them
    assert writers_busy(None, 0.0, workers=4, scoring_left=False) == 4


def test_children_report_their_times():
    with OutputWriter(2, shared={}) as writer:
        writer.expect(score_s=1e-6, scoring_left=True)
        for i in range(3):
            writer.submit(i, dict, b=i)
        assert writer.busy() == 1                  # one child at a time before a measurement
        writer.collect()
        assert writer.busy() == 1                  # measured, but 2 processes leave the scoring 1 core
        writer.expect(score_s=1e-6, scoring_left=False)
        assert writer.busy() == 2


def _boom(**shared):
    raise RuntimeError(f"warm-up failed with {sorted(shared)}")


def test_warm_up_runs_in_each_process_and_its_error_is_raised_at_close():
    writer = OutputWriter(2, shared={"a": 1}, warm=_boom)
    writer.expect(score_s=0.01, scoring_left=False)
    writer.submit(0, dict, b=0)
    assert writer.collect() == [(0, {"a": 1, "b": 0})]      # the writing itself is not held up
    with pytest.raises(RuntimeError, match=r"warm-up failed with \['a'\]"):
        writer.close()
