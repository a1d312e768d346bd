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


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (overlapping kernels count once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def step_timeline(step: Callable[[], object], steps: int = 20, device_type: str = "CUDA", top: int = 12,
                  name_chars: int = 70) -> dict:
    """Run ``step`` ``steps`` times under the profiler and say, per step (µs), how long the device
    was busy (the union of its kernels and copies), how long from its first to its last activity
    (``span``) and the gaps in between (``idle``: what no kernel covers: launch gaps, waits for the
    host), with the ``top`` device ops by time. Graph-replayed kernels show where the profiler sees
    into graphs; the work around the graph (uploads, sampling, token fill) shows either way.
    ``device_type``: "CUDA", or "CPU" (the CPU ops, for a smoke test without a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device_type == "CUDA" else ProfilerActivity.CPU
    if device_type == "CUDA":
        torch.cuda.synchronize()
    with profile(activities=[activity]) as prof:
        for _ in range(steps):
            step()
        if device_type == "CUDA":
            torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    spans = []
    for ev in prof.events():
        if ev.device_type.name == device_type and ev.time_range.end > ev.time_range.start:
            per[ev.name[:name_chars]] += (ev.time_range.end - ev.time_range.start) / steps
            spans.append((ev.time_range.start, ev.time_range.end))
    if not spans:
        return {"steps": steps, "error": f"no {device_type} activity profiled"}
    busy = busy_time(spans) / steps
    span = (max(e for _, e in spans) - min(s for s, _ in spans)) / steps
    return {"steps": steps, "busy_us": round(busy, 1), "span_us": round(span, 1), "idle_us": round(span - busy, 1),
            "ops_us": [(name, round(us, 1)) for name, us in sorted(per.items(), key=lambda kv: -kv[1])[:top]]}
