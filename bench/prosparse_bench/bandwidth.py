"""The host's DRAM read bandwidth, measured in the same run as the speeds it bounds.

A plain read of a buffer far larger than the L3 cache (several independent sums per thread, each
thread its own contiguous slice) through the runtime's own thread pool
(`_core._testing.read_bandwidth`): the ceiling a memory-bound decode can reach on this host now.
The VM's bandwidth drifts 10-20% over minutes, so a bench measures it before and after its runs.
"""
from __future__ import annotations

import statistics


def read_gbps(threads: int = 2, mb: float = 1024.0, seconds: float = 1.0) -> dict:
    """Median and best GB/s (1e9 bytes/s) over passes of at least `seconds` in all."""
    from prosparse_rt import _core
    nbytes, times, _ = _core._testing.read_bandwidth(float(mb), int(threads), float(seconds))
    return {"threads": threads, "mb": mb, "median_gbps": nbytes / statistics.median(times) / 1e9,
            "best_gbps": nbytes / min(times) / 1e9, "passes": len(times)}
