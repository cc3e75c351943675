"""Timing helper shared by the benchmark scripts."""

import time


def best_time(fn, repeat):
    """Best wall time of `repeat` calls of fn, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
