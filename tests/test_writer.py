"""influence.outputs.writer: the same results in the calling thread and in background processes."""
import pytest

from influence.outputs.writer import OutputWriter, Prefetched, default_workers


@pytest.mark.parametrize("workers", [0, 1])
def test_results_come_back_in_order_with_the_shared_arguments(workers):
    with OutputWriter(workers, shared={"a": 1}) as writer:
        for i in range(3):
            writer.submit(i, dict, b=i)
        assert writer.collect() == [(0, {"a": 1, "b": 0}), (1, {"a": 1, "b": 1}), (2, {"a": 1, "b": 2})]
        with pytest.raises(ValueError):     # at once in the thread; from the child at collect()
            writer.submit("bad", dict, "not a mapping")
            writer.collect()


def test_prefetched_images_and_worker_count():
    fetch = Prefetched({3: "img3"})
    assert fetch(3) == "img3" and fetch(3.0) == "img3"
    assert default_workers(2) == 0 and default_workers(100) >= 1
