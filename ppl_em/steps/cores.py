"""How many cores this process may use: the passes over the joint split across them."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import NamedTuple, TypeVar

T = TypeVar("T")


def usable_cores() -> int:
    """Cores in this process's affinity mask (all cores where the OS has no mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def halves(n: int, block: int, workers: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: ``0:n`` in two block-aligned halves with two workers (one
    span when ``n`` is too short for two blocks), else one span."""
    cut = (n // 2 // block) * block if workers >= 2 else n
    return [(0, cut), (cut, n)] if 0 < cut < n else [(0, n)]


def run_split(work: Callable[[int], T], count: int) -> list[T]:
    """``[work(0), ..., work(count - 1)]``, the first in this thread and each other in a
    thread of its own (the passes release the GIL); an error in any is re-raised here."""
    results: list = [None] * count

    def run(j: int) -> None:
        try:
            results[j] = work(j)
        except BaseException as exc:  # re-raised in the caller's thread below
            results[j] = _Failed(exc)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(1, count)]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    for value in results:
        if isinstance(value, _Failed):
            raise value.error
    return results


class _Failed(NamedTuple):
    error: BaseException
