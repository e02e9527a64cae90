"""The one timer of every bench command: wall-clock seconds per call after warm-up calls."""

from __future__ import annotations

import time


def call_times(fn, n: int, *, warmup: int = 1, sync=None, budget: float | None = None):
    """``(seconds per call, last output)`` of ``n`` timed calls of ``fn()``.

    ``warmup`` untimed calls come first (JIT compilation, first-touch allocation). ``sync()``, if
    given, waits for a device's queued work after the warm-up and inside every timed call, so that
    asynchronous launches are not mistaken for finished work. With ``budget`` (seconds), timing
    stops early once that much time has passed and at least two calls were timed.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    if sync is not None:
        sync()
    times = []
    t_end = None if budget is None else time.perf_counter() + budget
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
        if t_end is not None and time.perf_counter() > t_end and len(times) >= 2:
            break
    return times, out
