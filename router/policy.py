"""Routing policy: pure functions of worker loads and prefix overlaps. No Ray, no etcd, no clocks.

Decode choice (Dynamo's form), lowest cost wins:

    cost(w) = overlap_weight * new_prefill_blocks(w) + active_decode_blocks(w)
    new_prefill_blocks(w) = request_blocks - overlap(w)       active_decode_blocks(w) = w.num_used_blocks

Prefill choice (TensorRT-LLM's form), highest score wins:

    score(w) = overlap(w) - prefill_queue_weight * (w.num_running + w.num_waiting)

Cache-aware choice (the SGLang router's form), both roles; load = running + waiting requests:

    imbalanced (max_load - min_load > balance_abs_threshold and max_load > balance_rel_threshold * min_load)
        -> the least loaded worker                                            (reason "balance")
    else, if the longest cached prefix covers >= cache_threshold of the prompt
        -> the worker holding it                                               (reason "cache_hit")
    else -> the least loaded worker (then the most free KV blocks)             (reason "least_loaded")

Dynamo's cost prices a prefill block like a resident block of a running request, so with long
contexts one more running conversation on the prefix holder outweighs re-prefilling the whole
prompt elsewhere; the cache-aware form counts load in requests and keeps a conversation where
its prefix is until the loads really diverge.

Ties break deterministically: fewer queued requests, then the smaller worker id. Draining workers are
never chosen. Each choice returns a RoutingDecision (chosen id, every candidate's score, the reason)
so the endpoint can count decisions and show recent ones.

A request that wants prompt logprobs has its whole prompt computed wherever it is prefilled (no
cached prefix counts), so every worker is chosen for it on load alone (no overlap counts); the
prefill worker's KVHandle carries the logprobs to the decode worker.

Conditional disaggregation: the chosen decode worker prefills locally when the prompt tokens
missing from *its own* cache are below a threshold, when no prefill worker is eligible, or by
``conditional_disaggregation``:

    queue  every prefill worker already has prefill_queue_threshold requests waiting (reason
           prefill_queue_full)
    ttft   the estimated time to this prompt's first token is smaller locally (reason ttft_local):

           remote_s = (pending(p) + uncached_on(p)) / rate(p) + ttft_transfer_allowance_s
           local_s  = (pending(d) + uncached_on(d)) / rate(d)
           local only if pending(d) + uncached_on(d) <= local_prefill_max_pending_tokens
                   and those tokens' blocks are free on d (its last reported KV use)

           p: the chosen prefill worker, d: the chosen decode worker; pending: the worker's
           num_pending_prefill_tokens (the uncached tokens of this router's requests prefilled there
           whose first token has not come back, + what the worker reports beyond them);
           rate: prompt tokens per second (router/prefill_rates.py). The cap guards d's TPOT:
           every local prompt is computed inside its decode steps. The free-block rule keeps
           local prompts off a decode worker short of KV: there they would wait for blocks behind
           the imports that asked first (first come, first served, workers/engine/scheduler.py).
           Before both (2x H200, a 4096-token cap) such a worker collapsed: TTFT p50 62 s
           (benchmarks/README.md).

otherwise a prefill worker is chosen (reason disaggregated).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from router.config import RouterConfig
from workers.protocol import Role, WorkerLoad


class NoWorkerAvailable(RuntimeError):
    """No worker of ``role`` can take the request (none registered, or all draining)."""

    def __init__(self, role: Role, message: str):
        super().__init__(message)
        self.role = role
        self.message = message


@dataclass(frozen=True)
class WorkerScore:
    worker_id: str
    score: float  # kv_aware decode: a cost (lower wins); prefill: a score (higher wins); cache_aware: the
    # matched fraction of the prompt; round-robin: 0
    overlap_blocks: int
    num_queued: int  # running + waiting requests


@dataclass(frozen=True)
class RoutingDecision:
    role: Role
    worker_id: str
    reason: str  # lowest_cost | softmax_sample | highest_score | cache_hit | balance | least_loaded | round_robin
    num_request_blocks: int
    overlap_blocks: int  # the chosen worker's matched prefix blocks
    scores: tuple[WorkerScore, ...]  # every eligible candidate, by worker id
    num_draining_skipped: int = 0


@dataclass(frozen=True)
class TTFTEstimate:
    """Both paths' estimated time to the first token of one prompt (conditional_disaggregation: ttft)."""

    local_s: float
    remote_s: float
    local_pending_tokens: int  # the decode worker's pending prefill tokens + this prompt's uncached part
    remote_pending_tokens: int  # the same on the prefill worker
    local_rate_tokens_per_s: float
    remote_rate_tokens_per_s: float
    local_free_blocks: int  # the decode worker's free KV blocks as last reported
    local_allowed: bool  # local_pending_tokens <= local_prefill_max_pending_tokens, and fit in local_free_blocks
    local_over_cap: bool = False  # local_pending_tokens > local_prefill_max_pending_tokens

    @property
    def prefers_local(self) -> bool:
        return self.local_allowed and self.local_s < self.remote_s

    @property
    def remote_because(self) -> str | None:
        """Why the prompt went to the prefill worker (None: it stays local): over_cap (the decode
        worker's pending prefill tokens would pass the cap), short_of_blocks (they would not fit in
        its free KV blocks), or slower (local was allowed but estimated slower)."""
        if self.prefers_local:
            return None
        if not self.local_allowed:
            return "over_cap" if self.local_over_cap else "short_of_blocks"
        return "slower"


@dataclass(frozen=True)
class RoutePlan:
    """One request's route. ``prefill is None`` means the decode worker prefills locally."""

    decode: RoutingDecision
    prefill: RoutingDecision | None
    num_uncached_tokens: int  # prompt tokens missing from the decode worker's cache
    # disaggregated | uncached_below_threshold | no_prefill_worker | prefill_queue_full | ttft_local
    reason: str
    ttft: TTFTEstimate | None = None  # conditional_disaggregation: ttft, once both paths were weighed
    num_remote_uncached_tokens: int = 0  # prompt tokens missing from the prefill worker's cache

    @property
    def prefill_locally(self) -> bool:
        return self.prefill is None


def num_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks a prompt occupies, the partial last one included."""
    if block_size <= 0 or num_tokens < 0:
        raise ValueError(f"need block_size > 0 and num_tokens >= 0, got {block_size}, {num_tokens}")
    return -(-num_tokens // block_size)


def choose_decode(num_request_blocks: int, candidates: Sequence[WorkerLoad], overlaps: Mapping[str, int], *,
                  overlap_weight: float = 1.0, temperature: float = 0.0,
                  rng: random.Random | None = None) -> RoutingDecision:
    """Lowest ``overlap_weight * new_prefill_blocks + active_decode_blocks``; with temperature > 0,
    sample from softmax(-normalised_cost / temperature) using ``rng`` (required, for reproducibility)."""
    if overlap_weight < 0 or temperature < 0:
        raise ValueError("overlap_weight and temperature must be >= 0")
    eligible, num_draining = _eligible(Role.DECODE, candidates)
    scores = []
    for w in eligible:
        overlap = _overlap(overlaps, w.worker_id, num_request_blocks)
        cost = overlap_weight * (num_request_blocks - overlap) + w.num_used_blocks
        scores.append(WorkerScore(w.worker_id, cost, overlap, w.num_running + w.num_waiting))
    if temperature > 0:
        if rng is None:
            raise ValueError("softmax sampling (temperature > 0) needs a seeded rng")
        chosen, reason = _softmax_pick(scores, temperature, rng), "softmax_sample"
    else:
        chosen, reason = min(scores, key=lambda s: (s.score, s.num_queued, s.worker_id)), "lowest_cost"
    return _decision(Role.DECODE, chosen, reason, num_request_blocks, scores, num_draining)


def choose_prefill(num_request_blocks: int, candidates: Sequence[WorkerLoad], overlaps: Mapping[str, int], *,
                   queue_weight: float = 0.25) -> RoutingDecision:
    """Highest ``matched_blocks - queue_weight * (running + waiting)``: reuse a cached prefix unless
    that worker's queue costs more than the blocks it saves."""
    if queue_weight < 0:
        raise ValueError("queue_weight must be >= 0")
    eligible, num_draining = _eligible(Role.PREFILL, candidates)
    scores = []
    for w in eligible:
        overlap = _overlap(overlaps, w.worker_id, num_request_blocks)
        queued = w.num_running + w.num_waiting
        scores.append(WorkerScore(w.worker_id, overlap - queue_weight * queued, overlap, queued))
    chosen = min(scores, key=lambda s: (-s.score, s.num_queued, s.worker_id))
    return _decision(Role.PREFILL, chosen, "highest_score", num_request_blocks, scores, num_draining)


def choose_cache_aware(role: Role, num_request_blocks: int, candidates: Sequence[WorkerLoad],
                       overlaps: Mapping[str, int], *, cache_threshold: float = 0.5, balance_abs_threshold: int = 8,
                       balance_rel_threshold: float = 1.5) -> RoutingDecision:
    """The SGLang router's rule (module docstring): balance when loads diverge, else follow the
    longest cached prefix if it covers enough of the prompt, else the least loaded worker."""
    if not 0 <= cache_threshold <= 1 or balance_abs_threshold < 0 or balance_rel_threshold < 1:
        raise ValueError("need 0 <= cache_threshold <= 1, balance_abs_threshold >= 0, balance_rel_threshold >= 1")
    eligible, num_draining = _eligible(role, candidates)
    scores, free = [], {}
    for w in eligible:
        overlap = _overlap(overlaps, w.worker_id, num_request_blocks)
        scores.append(WorkerScore(w.worker_id, overlap / num_request_blocks if num_request_blocks else 0.0, overlap,
                                  w.num_running + w.num_waiting))
        free[w.worker_id] = w.num_total_blocks - w.num_used_blocks
    loads = [s.num_queued for s in scores]
    least = min(scores, key=lambda s: (s.num_queued, -free[s.worker_id], s.worker_id))
    if max(loads) - min(loads) > balance_abs_threshold and max(loads) > balance_rel_threshold * min(loads):
        return _decision(role, least, "balance", num_request_blocks, scores, num_draining)
    best = min(scores, key=lambda s: (-s.overlap_blocks, s.num_queued, s.worker_id))
    if best.overlap_blocks > 0 and best.score >= cache_threshold:
        return _decision(role, best, "cache_hit", num_request_blocks, scores, num_draining)
    return _decision(role, least, "least_loaded", num_request_blocks, scores, num_draining)


class RoundRobin:
    """Cycles through eligible workers in id order, per role; for comparison with kv_aware.

    Keeps only the last chosen id per role, so workers joining or leaving never reset the cycle.
    """

    def __init__(self) -> None:
        self._last: dict[Role, str] = {}

    def choose(self, role: Role, candidates: Sequence[WorkerLoad], num_request_blocks: int = 0,
               overlaps: Mapping[str, int] | None = None, advance: bool = True) -> RoutingDecision:
        """The next worker of the cycle; ``advance=False`` only looks (commit() moves on to it)."""
        eligible, num_draining = _eligible(role, candidates)
        overlaps = overlaps or {}
        scores = [WorkerScore(w.worker_id, 0.0, _overlap(overlaps, w.worker_id, num_request_blocks),
                              w.num_running + w.num_waiting) for w in eligible]
        last = self._last.get(role)
        chosen = next((s for s in scores if last is None or s.worker_id > last), scores[0])
        if advance:
            self.commit(role, chosen.worker_id)
        return _decision(role, chosen, "round_robin", num_request_blocks, scores, num_draining)

    def commit(self, role: Role, worker_id: str) -> None:
        self._last[role] = worker_id


def should_prefill_locally(num_uncached_tokens: int, threshold_tokens: int) -> bool:
    """Conditional disaggregation: a short uncached tail is cheaper to prefill than to transfer."""
    if num_uncached_tokens < 0 or threshold_tokens < 0:
        raise ValueError("num_uncached_tokens and threshold_tokens must be >= 0")
    return num_uncached_tokens < threshold_tokens


def estimate_ttft(decode: WorkerLoad, num_local_uncached: int, local_rate_tokens_per_s: float,
                  prefill: WorkerLoad, num_remote_uncached: int, remote_rate_tokens_per_s: float, *,
                  transfer_allowance_s: float, local_max_pending_tokens: int, block_size: int) -> TTFTEstimate:
    """Time to the first token on each path: the prompt waits behind every token pending there."""
    if local_rate_tokens_per_s <= 0 or remote_rate_tokens_per_s <= 0:
        raise ValueError(f"prefill rates must be > 0, got {local_rate_tokens_per_s}, {remote_rate_tokens_per_s}")
    if min(num_local_uncached, num_remote_uncached, local_max_pending_tokens) < 0 or transfer_allowance_s < 0:
        raise ValueError("token counts, the pending cap and the transfer allowance must be >= 0")
    local = decode.num_pending_prefill_tokens + num_local_uncached
    remote = prefill.num_pending_prefill_tokens + num_remote_uncached
    free_blocks = max(0, decode.num_total_blocks - decode.num_used_blocks)
    return TTFTEstimate(local_s=local / local_rate_tokens_per_s,
                        remote_s=remote / remote_rate_tokens_per_s + transfer_allowance_s,
                        local_pending_tokens=local, remote_pending_tokens=remote,
                        local_rate_tokens_per_s=local_rate_tokens_per_s,
                        remote_rate_tokens_per_s=remote_rate_tokens_per_s,
                        local_allowed=(local <= local_max_pending_tokens
                                       and num_blocks(local, block_size) <= free_blocks),
                        local_free_blocks=free_blocks, local_over_cap=local > local_max_pending_tokens)


def plan_route(num_prompt_tokens: int, block_size: int, decode_candidates: Sequence[WorkerLoad],
               prefill_candidates: Sequence[WorkerLoad], overlaps: Mapping[str, int], config: RouterConfig, *,
               rng: random.Random | None = None, round_robin: RoundRobin | None = None,
               prefill_rates: Mapping[str, float] | None = None, prompt_logprobs: bool = False) -> RoutePlan:
    """The whole routing step: pick decode, decide local prefill from its own overlap, else pick prefill.

    ``overlaps``: PrefixIndex.overlap() of the request's block hashes (workers of both roles).
    ``prefill_rates``: prompt tokens per second by worker id (conditional_disaggregation ttft); a
    worker missing from it is taken at its role's configured prior.
    With no eligible prefill worker the decode worker prefills locally (reason no_prefill_worker).
    ``prompt_logprobs``: the request wants them: the whole prompt uncached (module docstring).
    Raises NoWorkerAvailable when no decode worker is eligible.
    """
    request_blocks = num_blocks(num_prompt_tokens, block_size)
    if prompt_logprobs:
        overlaps = {}
    if config.policy == "round_robin":
        if round_robin is None:
            raise ValueError("policy round_robin needs a RoundRobin instance (it keeps the cycle)")
        decode = round_robin.choose(Role.DECODE, decode_candidates, request_blocks, overlaps)
    elif config.policy == "cache_aware":
        decode = choose_cache_aware(Role.DECODE, request_blocks, decode_candidates, overlaps, **_cache_aware_args(config))
    else:
        decode = choose_decode(request_blocks, decode_candidates, overlaps, overlap_weight=config.overlap_weight,
                               temperature=config.temperature, rng=rng)
    # [0, cached) on the decode worker | [cached, num_prompt_tokens) to prefill
    num_cached = min(decode.overlap_blocks * block_size, num_prompt_tokens)
    num_uncached = num_prompt_tokens - num_cached
    if should_prefill_locally(num_uncached, config.local_prefill_threshold_tokens):
        return RoutePlan(decode, None, num_uncached, "uncached_below_threshold")
    if not any(not w.is_draining for w in prefill_candidates):
        return RoutePlan(decode, None, num_uncached, "no_prefill_worker")
    mode = config.conditional_mode
    if mode == "queue" and prefill_queue_full(prefill_candidates, config.prefill_queue_threshold):
        return RoutePlan(decode, None, num_uncached, "prefill_queue_full")
    if config.policy == "round_robin":
        # under ttft a prompt may yet stay local: the cycle moves on only once it goes to this worker
        prefill = round_robin.choose(Role.PREFILL, prefill_candidates, request_blocks, overlaps,
                                     advance=mode != "ttft")
    elif config.policy == "cache_aware":
        prefill = choose_cache_aware(Role.PREFILL, request_blocks, prefill_candidates, overlaps,
                                     **_cache_aware_args(config))
    else:
        prefill = choose_prefill(request_blocks, prefill_candidates, overlaps, queue_weight=config.prefill_queue_weight)
    # [0, cached) on the prefill worker | [cached, num_prompt_tokens) it computes
    num_remote_uncached = num_prompt_tokens - min(prefill.overlap_blocks * block_size, num_prompt_tokens)
    estimate = None
    if mode == "ttft":
        rates = prefill_rates or {}
        estimate = estimate_ttft(
            _load_of(decode.worker_id, decode_candidates), num_uncached,
            rates.get(decode.worker_id, config.local_prefill_rate_prior_tokens_per_s),
            _load_of(prefill.worker_id, prefill_candidates), num_remote_uncached,
            rates.get(prefill.worker_id, config.prefill_rate_prior_tokens_per_s),
            transfer_allowance_s=config.ttft_transfer_allowance_s,
            local_max_pending_tokens=config.local_prefill_max_pending_tokens, block_size=block_size)
        if estimate.prefers_local:
            return RoutePlan(decode, None, num_uncached, "ttft_local", estimate)
        if config.policy == "round_robin":
            round_robin.commit(Role.PREFILL, prefill.worker_id)
    return RoutePlan(decode, prefill, num_uncached, "disaggregated", estimate, num_remote_uncached)


def prefill_queue_full(prefill_candidates: Sequence[WorkerLoad], threshold: int) -> bool:
    """Every eligible prefill worker has at least ``threshold`` requests queued (0: never full).
    A prefill would wait behind them while the decode worker could start it now."""
    if threshold <= 0:
        return False
    eligible = [w for w in prefill_candidates if not w.is_draining]
    return bool(eligible) and all(w.num_waiting >= threshold for w in eligible)


# -- helpers ---------------------------------------------------------------------------------------
def _load_of(worker_id: str, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
    return next(w for w in candidates if w.worker_id == worker_id)


def _cache_aware_args(config: RouterConfig) -> dict:
    return {"cache_threshold": config.cache_threshold, "balance_abs_threshold": config.balance_abs_threshold,
            "balance_rel_threshold": config.balance_rel_threshold}


def _eligible(role: Role, candidates: Sequence[WorkerLoad]) -> tuple[list[WorkerLoad], int]:
    """Non-draining candidates sorted by id; raises on a wrong role or a duplicate id."""
    seen: set[str] = set()
    for w in candidates:
        if w.role is not role:
            raise ValueError(f"worker {w.worker_id!r} has role {w.role.value}, expected {role.value}")
        if w.worker_id in seen:
            raise ValueError(f"worker {w.worker_id!r} appears twice among the candidates")
        seen.add(w.worker_id)
    eligible = sorted((w for w in candidates if not w.is_draining), key=lambda w: w.worker_id)
    num_draining = len(candidates) - len(eligible)
    if not eligible:
        what = f"all {num_draining} are draining" if num_draining else "none is registered"
        raise NoWorkerAvailable(role, f"no {role.value} worker available: {what}")
    return eligible, num_draining


def _overlap(overlaps: Mapping[str, int], worker_id: str, num_request_blocks: int) -> int:
    overlap = overlaps.get(worker_id, 0)
    if not 0 <= overlap <= num_request_blocks:
        raise ValueError(f"overlap {overlap} of worker {worker_id!r} is outside [0, {num_request_blocks}]")
    return overlap


def _softmax_pick(scores: list[WorkerScore], temperature: float, rng: random.Random) -> WorkerScore:
    # Costs are min-max normalised to [0, 1] so the temperature means the same at any load scale.
    costs = [s.score for s in scores]
    low, span = min(costs), max(costs) - min(costs)
    weights = [math.exp(-((c - low) / span if span else 0.0) / temperature) for c in costs]
    return rng.choices(scores, weights=weights, k=1)[0]


def _decision(role: Role, chosen: WorkerScore, reason: str, num_request_blocks: int,
              scores: list[WorkerScore], num_draining: int) -> RoutingDecision:
    return RoutingDecision(role=role, worker_id=chosen.worker_id, reason=reason,
                           num_request_blocks=num_request_blocks, overlap_blocks=chosen.overlap_blocks,
                           scores=tuple(scores), num_draining_skipped=num_draining)
