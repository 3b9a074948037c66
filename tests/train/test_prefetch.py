"""Batches prepared ahead in a thread are the batches of the loop, in order; errors surface at
their step."""

import threading

import pytest

from flaxlab.train.config import TrainConfig
from flaxlab.train.prefetch import Prefetcher


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_values_are_fn_of_each_step_and_run_ahead(depth):
    calls, threads = [], set()

    def fn(step):
        calls.append(step)
        threads.add(threading.current_thread().name)
        return step * step

    with Prefetcher(fn, 5, 12, depth) as prefetcher:
        assert [prefetcher.get(step) for step in range(5, 12)] == [s * s for s in range(5, 12)]
    assert sorted(calls) == list(range(5, 12))  # each step once, none past the last
    assert (depth == 0) == (threads == {threading.current_thread().name})


def test_an_error_is_raised_by_the_get_of_its_step():
    def fn(step):
        if step == 3:
            raise ValueError("bad batch 3")
        return step

    with Prefetcher(fn, 0, 10, 2) as prefetcher:
        assert [prefetcher.get(s) for s in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad batch 3"):
            prefetcher.get(3)


def test_prefetch_must_not_be_negative():
    with pytest.raises(ValueError, match=r"train.prefetch=-1 must be >= 0"):
        TrainConfig(prefetch=-1)
