"""Device kernels by time under torch.profiler, for the GPU profiling scripts
(profile_decode.py, profile_prefill.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch


def kernel_times(fn: Callable[[], object], repeats: int = 1, top: int = 12,
                 name_chars: int = 70) -> tuple[float, list[tuple[str, float]]]:
    """Run ``fn`` ``repeats`` times under the profiler; returns (all kernels' time per call, the
    ``top`` kernels by time per call), in microseconds, names cut to ``name_chars``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            per[ev.name[:name_chars]] += ev.device_time_total / repeats
    return sum(per.values()), sorted(per.items(), key=lambda kv: -kv[1])[:top]
