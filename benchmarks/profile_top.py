"""cProfile over engine steps, shared by host_profile.py and step_host_cost.py: the raw stats and
the functions with the most own time per step. Standard library only: step_host_cost.py --before
imports it next to another checkout's ``workers``."""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path


def run_profiled(step, steps: int) -> dict:
    """step() ``steps`` times under cProfile; pstats' table {(file, line, func): (cc, nc, tottime, cumtime, callers)}."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    return pstats.Stats(prof).stats


def top_own_us(stats: dict, steps: int, n: int = 25) -> list[tuple[str, int, float]]:
    """The n functions with the most own time: (file:line:function, calls per step, µs per step)."""
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [(f"{Path(f).name}:{line}:{fn}", v[1] // steps, round(v[2] * 1e6 / steps, 1)) for (f, line, fn), v in top]
