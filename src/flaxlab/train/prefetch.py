"""Batches prepared ahead in a background thread (reading, augmenting and placing a batch
overlaps the devices' work on the previous steps)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class Prefetcher:
    """``get(step)`` returns ``fn(step)``, computed up to ``depth`` steps ahead for the steps
    ``first, first + 1, ..., last - 1`` requested in order. ``depth=0`` calls ``fn`` in place.
    An error of ``fn`` is raised by the ``get`` of its step."""

    def __init__(self, fn: Callable[[int], Any], first: int, last: int, depth: int = 2):
        self.fn, self.last, self.depth = fn, last, depth
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flaxlab-batches") if depth else None
        self._futures: dict[int, Future] = {}
        self._next = first
        self._fill(first)

    def _fill(self, step: int) -> None:
        if self._pool is None:
            return
        self._next = max(self._next, step)
        while self._next < min(step + self.depth, self.last):
            self._futures[self._next] = self._pool.submit(self.fn, self._next)
            self._next += 1

    def get(self, step: int) -> Any:
        if self._pool is None:
            return self.fn(step)
        future = self._futures.pop(step, None)
        self._fill(step + 1)
        return future.result() if future is not None else self.fn(step)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
