"""Side-by-side timing shared by the benchmarks: alternating repeats, a settle pause, medians."""

from __future__ import annotations

import statistics
import time

# Idle time before each timed call: the previous framework's worker threads (OpenMP / XLA's pool)
# keep spinning for a while after their last op and would otherwise steal the cores.
SETTLE_S = 0.5


def timed(fn) -> float:
    """Seconds of one call of `fn`, after the settle pause."""
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int, warmup: int = 2, raw: dict | None = None) -> dict[str, float]:
    """Median seconds per call of each fn, alternating between them each repeat; `warmup` untimed
    calls each first (compilation). Every time also goes into `raw[name]` when given."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {} if raw is None else raw
    for k in fns:
        times.setdefault(k, [])
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(times[k]) for k in fns}
