"""Summary of one run: latency percentiles, throughput and goodput (pure functions of the results).

Goodput follows DistServe (OSDI'24): a request counts only if it meets BOTH latency targets,
its TTFT <= ``ttft_slo_s`` and its TPOT (mean time per output token after the first) <=
``itl_slo_s``; failed requests never count.

    goodput_rps      = requests meeting both targets / run duration
    slo_attainment   = requests meeting both targets / requests sent
    throughput_tok_s = output tokens of finished requests / run duration
    run duration     = first send -> last token of the run

The issue's literal reading of an "ITL target" is stricter and is reported beside it: a request
counts for ``goodput_itl_rps`` / ``slo_attainment_itl`` if its TTFT meets the target and EVERY gap
between its streamed tokens is <= ``itl_slo_s`` (no stall in the stream; DistServe's TPOT averages
a stall away over the request's tokens).

DistServe's headline figure, the highest rate whose attainment stays >= 90 %, is
``max_rate_at_attainment`` over a sweep of rates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from benchmarks.serve_client import RequestResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# DistServe's "SLO scale": both targets times s (s < 1: tighter). Attainment at each scale from the
# same requests shows where on the latency axis one mode overtakes the other; the targets the
# profile sets (scale 1) stay the benchmark's verdict.
SLO_SCALES = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5)


def _meets(r: RequestResult, ttft_slo_s: float, itl_slo_s: float) -> bool:
    """DistServe's goodput rule for a finished request: TTFT and TPOT (mean gap) within target."""
    return r.ttft_s <= ttft_slo_s and (r.tpot_s is None or r.tpot_s <= itl_slo_s)


def _attainment(ok: Sequence[RequestResult], n: int, ttft_slo_s: float, itl_slo_s: float) -> float:
    return _r(sum(_meets(r, ttft_slo_s, itl_slo_s) for r in ok) / n if n else 0.0)


def summarize(results: Sequence[RequestResult], ttft_slo_s: float, itl_slo_s: float) -> dict:
    if ttft_slo_s <= 0 or itl_slo_s <= 0:
        raise ValueError("the latency targets must be > 0 s")
    ok = [r for r in results if r.ok]
    sent = [r.sent_s for r in results]
    ends = [r.finished_s for r in ok]
    duration = (max(ends) - min(sent)) if ends and sent else 0.0
    ttft = [r.ttft_s for r in ok]
    itl = [x for r in ok for x in r.itl_s]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s for r in ok]
    good = [r for r in ok if _meets(r, ttft_slo_s, itl_slo_s)]
    smooth = [r for r in ok if r.ttft_s <= ttft_slo_s and max(r.itl_s, default=0.0) <= itl_slo_s]
    prompt = sum(r.num_prompt_tokens for r in ok)
    out = {
        "num_requests": len(results), "num_ok": len(ok), "num_failed": len(results) - len(ok),
        "duration_s": _r(duration, 3),
        "goodput_rps": _r(len(good) / duration if duration > 0 else 0.0),
        "slo_attainment": _r(len(good) / len(results) if results else 0.0),
        "goodput_itl_rps": _r(len(smooth) / duration if duration > 0 else 0.0),
        "slo_attainment_itl": _r(len(smooth) / len(results) if results else 0.0),
        "throughput_tok_s": _r(sum(r.num_output_tokens for r in ok) / duration if duration > 0 else 0.0, 2),
        "request_rps": _r(len(ok) / duration if duration > 0 else 0.0),
        "ttft_slo_s": ttft_slo_s, "itl_slo_s": itl_slo_s,
        "prefix_hit_rate": _r(sum(r.num_cached_tokens for r in ok) / prompt if prompt else 0.0),
        "max_lateness_s": _r(max((r.lateness_s for r in results), default=0.0)),
        # slo_attainment's rule (_meets) with both targets scaled
        "slo_attainment_by_scale": {str(k): _attainment(ok, len(results), ttft_slo_s * k, itl_slo_s * k)
                                    for k in SLO_SCALES},
    }
    for name, xs in (("ttft", ttft), ("itl", itl), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = _r(percentile(xs, q))
        out[f"{name}_mean_s"] = _r(sum(xs) / len(xs) if xs else None)
    errors = sorted({r.error for r in results if r.error})
    if errors:
        out["errors"] = errors[:5]
    return out


def max_rate_at_attainment(rows: Iterable[dict], target: float = 0.9, key: str = "slo_attainment") -> float | None:
    """The highest rate whose ``key`` (slo_attainment or slo_attainment_itl) >= target, over rows of
    one configuration; None if none."""
    rates = [row["rate"] for row in rows if row[key] >= target]
    return max(rates) if rates else None
