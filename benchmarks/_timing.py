"""Timing helpers shared by the speed benchmarks."""

import os
import sys
import time


def steady_malloc():
    """Re-exec with glibc keeping freed large blocks mapped.

    Timing noise on this VM is dominated by page faults of freshly mapped
    buffers (glibc unmaps large blocks on free); raising glibc's mmap/trim
    thresholds speeds torch, TVM and the simulator alike and makes repeated
    runs agree.
    """
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="4294967296")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def best_of(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls, after one warm-up call (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
