"""Each worker's prefill rate (prompt tokens computed per second), learned from its own polls.

The router's TTFT estimate (router/policy.py, conditional_disaggregation: ttft) divides a worker's
pending prefill tokens by this rate. A worker's counters say how many uncached prompt tokens it
admitted (``num_prompt_tokens - num_prompt_tokens_cached``, counted when a request is admitted,
not chunk by chunk). Between two polls:

    d_tokens / dt   with pending > 0 at both polls  -> the worker was prefilling the whole time:
                                                       a sample of its rate (averaged, below)
    d_tokens / dt   with pending == 0 at the second -> everything admitted meanwhile was also
                                                       computed meanwhile: a lower bound; moves
                                                       the estimate up (same average), never down
    anything else                                   -> says nothing about capacity (an idle
                                                       worker's throughput is its arrival rate)

The average weighs each sample by its interval: rate += dt / (memory_s + dt) * (sample - rate),
memory_s = PRIOR_WEIGHT_S + min(seconds sampled so far, window_s). The configured prior counts as
PRIOR_WEIGHT_S of samples (one poll): it stands in until the first one and weighs PRIOR_WEIGHT_S /
(PRIOR_WEIGHT_S + t) after t seconds of busy polls, so a burst of a few seconds outvotes a wrong
prior; past window_s of samples it is an EWMA with that time constant. Admission-time counting makes single samples lumpy (a
2k-token prompt counts whole when its first chunk runs); averaging over busy polls smooths that,
and lower bounds are only taken from intervals that end drained. Pure: the caller passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

_MIN_RATE_TOKENS_PER_S = 1.0
PRIOR_WEIGHT_S = 0.1  # one poll interval


@dataclass
class _Last:
    at_s: float
    num_tokens: int  # uncached prompt tokens admitted, monotonic per worker incarnation
    num_pending_tokens: int


@dataclass(frozen=True)
class RateView:
    tokens_per_s: float
    is_measured: bool  # False: the configured prior


class PrefillRates:
    def __init__(self, window_s: float):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._last: dict[str, _Last] = {}
        self._rate: dict[str, float] = {}
        self._sampled_s: dict[str, float] = {}

    def observe(self, worker_id: str, at_s: float, num_tokens: int, num_pending_tokens: int,
                prior_tokens_per_s: float) -> None:
        """One poll's answer: the worker's admitted uncached prompt tokens so far and its pending ones.
        The average starts from the prior (one lumpy sample does not replace it)."""
        prev = self._last.get(worker_id)
        self._last[worker_id] = _Last(at_s, num_tokens, num_pending_tokens)
        if prev is None:
            return
        dt, d_tokens = at_s - prev.at_s, num_tokens - prev.num_tokens
        if dt <= 0 or d_tokens < 0:  # a restarted worker counts from 0 again: start over
            return
        sample = d_tokens / dt
        rate = self._rate.get(worker_id, prior_tokens_per_s)
        busy = prev.num_pending_tokens > 0 and num_pending_tokens > 0
        lower_bound = num_pending_tokens == 0 and sample > rate
        if busy or lower_bound:
            sampled_s = self._sampled_s.get(worker_id, 0.0)
            memory_s = PRIOR_WEIGHT_S + min(sampled_s, self.window_s)
            self._rate[worker_id] = rate + dt / (memory_s + dt) * (sample - rate)
            self._sampled_s[worker_id] = sampled_s + dt

    def rate(self, worker_id: str, prior_tokens_per_s: float) -> RateView:
        measured = self._rate.get(worker_id)
        if measured is None:
            return RateView(prior_tokens_per_s, False)
        # a busy worker that admitted nothing for a while drives the average towards 0: keep it
        # positive (an estimate divides by it) but let it say "very slow"
        return RateView(max(measured, _MIN_RATE_TOKENS_PER_S), True)

    def forget(self, worker_id: str) -> None:
        self._last.pop(worker_id, None)
        self._rate.pop(worker_id, None)
        self._sampled_s.pop(worker_id, None)
