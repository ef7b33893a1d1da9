"""Timing shared by the benchmarks: medians of interleaved repeats, timed with CUDA events on a GPU.

On a CUDA device each call is bracketed by two `torch.cuda.Event`s (recorded on the current stream) and all of a
round's events are read after one synchronize, so the host never waits between calls; elsewhere a host clock is
read around each call. Warm-up calls (kernel selection, allocator growth, compilation) are made first and dropped.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

Step = Callable[[], object]


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def median_ms(steps: dict[str, Step], device: str | torch.device, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each step, the steps interleaved (a, b, c, a, b, c, ...) over `repeats`
    rounds after `warmup` untimed rounds."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    if is_cuda(device):
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            events = {}
            for name, step in steps.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize(device)
            for name, (start, end) in events.items():
                times[name].append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}
