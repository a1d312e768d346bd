"""KV quota policy: a pure function that divides one node's KV budget among the workers sharing it.

    plan_quotas(node_budget_blocks, workers, config, memory_pressure) -> {worker_id: target_blocks}

Invariants of every plan (g = block_granularity, e.g. the engine's blocks_per_segment):
  * target >= used_blocks (a shrink never takes a block in use; pinned blocks are part of used);
  * target is a multiple of g;
  * sum(targets) <= budget * (1 - memory_pressure), unless the blocks in use alone exceed it, in
    which case every worker is planned at its used blocks (rounded up to g): the tightest safe plan;
  * target >= min_blocks_per_worker whenever the budget can give every worker its min.

How (all arithmetic in units of g blocks):
  1. floor(w) = max(used, min); if the floors do not fit, min is given up proportionally, used never.
  2. ideal(w) = floor(w) + a share of the rest of the budget, by demand:
         demand(w) = 1 + waiting_weight * num_waiting + preemption_weight * num_preemptions
                       + usage_weight * used / quota
     so a decode worker that queues or preempts gets more and an idle pool drifts to an equal share.
  3. target(w) moves from the current quota toward ideal(w) by at most
     max(min_step_blocks, max_step_fraction * quota) per round (no oscillation, no big jumps);
     growth only takes room that is free after the others' (step-limited) shrinks.
  4. If that still exceeds the budget (the budget fell, or memory pressure), everyone's part above
     its floor is cut by the same fraction: a proportional shrink that never goes below used.

Applying a plan (the resizer loop's job): shrink first, then grow only into what the shrinks freed,
since a shrink is best-effort (the engine reports how far it got).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.protocol import Role


class KVQuotaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    interval_s: float = Field(5, gt=0, description="How often the resizer plans and applies quotas")
    node_kv_budget_bytes: int | None = Field(None, gt=0, description="KV bytes per node shared by its workers")
    min_blocks_per_worker: int = Field(16, ge=0, description="Floor for every worker when the budget allows")
    max_step_fraction: float = Field(0.25, gt=0, le=1, description="Largest change per round, as a share of the quota")
    min_step_blocks: int = Field(16, ge=1, description="A change per round may always be this large")
    demand_waiting_weight: float = Field(1.0, ge=0, description="Demand per waiting request")
    demand_preemption_weight: float = Field(4.0, ge=0, description="Demand per preemption since the last round")
    demand_usage_weight: float = Field(2.0, ge=0, description="Demand per unit of used / quota")
    # the node's budget and memory-pressure thresholds, applied by the resizer loop (cluster/kv_resizer.py)
    budget_fraction: float = Field(0.3, gt=0, le=1, description="KV budget as a share of the node's memory (device "
                                   "memory on CUDA, RAM on CPU) when node_kv_budget_bytes is not set")
    memory_high_percent: float = Field(90.0, gt=0, le=100, description="Node memory use (%) above which the planned "
                                       "workers' KV is capped to bring the node back under it")
    memory_low_percent: float = Field(80.0, gt=0, le=100, description="The cap holds until node memory use (%) falls "
                                      "under this (hysteresis: no shrink-grow-shrink cycle)")

    @model_validator(mode="after")
    def _memory_thresholds(self) -> "KVQuotaConfig":
        if self.memory_low_percent > self.memory_high_percent:
            raise ValueError(f"memory_low_percent ({self.memory_low_percent}) must be <= memory_high_percent "
                             f"({self.memory_high_percent})")
        return self


@dataclass(frozen=True)
class WorkerKVState:
    worker_id: str
    role: Role
    quota_blocks: int  # current KV quota
    used_blocks: int  # blocks that cannot be freed now: held by requests, pinned ones included
    pinned_blocks: int = 0  # the part of used_blocks pinned for a KV transfer lease
    cached_free_blocks: int = 0  # free blocks keeping reusable prefixes (a shrink may evict them)
    num_waiting: int = 0  # requests queued for lack of blocks or batch room, and imports waiting for blocks
    num_preemptions: int = 0  # requests preempted for lack of blocks since the last round

    def __post_init__(self) -> None:
        for name in ("quota_blocks", "used_blocks", "pinned_blocks", "cached_free_blocks", "num_waiting",
                     "num_preemptions"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.worker_id}: {name} must be >= 0, got {getattr(self, name)}")
        if self.pinned_blocks > self.used_blocks:
            raise ValueError(f"{self.worker_id}: pinned_blocks ({self.pinned_blocks}) are part of used_blocks "
                             f"({self.used_blocks}) and cannot exceed them")


def budget_blocks_from_bytes(node_kv_budget_bytes: int, block_bytes: int) -> int:
    """Whole KV blocks (all layers, K and V) that fit in a byte budget."""
    if node_kv_budget_bytes < 0 or block_bytes <= 0:
        raise ValueError("need node_kv_budget_bytes >= 0 and block_bytes > 0")
    return node_kv_budget_bytes // block_bytes


def plan_quotas(node_budget_blocks: int, workers: Sequence[WorkerKVState], config: KVQuotaConfig,
                memory_pressure: float = 0.0, *, block_granularity: int = 1) -> dict[str, int]:
    """Target quota per worker (see the module docstring for the invariants).

    ``memory_pressure`` in [0, 1]: the share of the budget the node needs back now (0 = none).
    """
    if node_budget_blocks < 0:
        raise ValueError(f"node_budget_blocks must be >= 0, got {node_budget_blocks}")
    if not 0.0 <= memory_pressure <= 1.0:
        raise ValueError(f"memory_pressure must be in [0, 1], got {memory_pressure}")
    if block_granularity < 1:
        raise ValueError(f"block_granularity must be >= 1, got {block_granularity}")
    ids = [w.worker_id for w in workers]
    if len(set(ids)) != len(ids):
        raise ValueError("worker ids must be unique")
    if not workers:
        return {}

    g = block_granularity
    budget = math.floor(node_budget_blocks * (1.0 - memory_pressure)) // g
    current = [_ceil_div(w.quota_blocks, g) for w in workers]
    hard = [_ceil_div(w.used_blocks, g) for w in workers]
    soft = [max(h, _ceil_div(config.min_blocks_per_worker, g)) for h in hard]

    # 1. floors: min where it fits, used always
    if sum(soft) <= budget:
        floors = soft
    elif sum(hard) <= budget:
        extra = _apportion(budget - sum(hard), [s - h for s, h in zip(soft, hard)], ids)
        floors = [h + e for h, e in zip(hard, extra)]
    else:
        return {wid: h * g for wid, h in zip(ids, hard)}

    # 2. ideal split of the rest by demand
    shares = _apportion(budget - sum(floors), [_demand(w, config) for w in workers], ids)
    ideal = [f + s for f, s in zip(floors, shares)]

    # 3. move gradually toward it, never below the floor
    min_step = _ceil_div(config.min_step_blocks, g)
    target = []
    for cur, want, low in zip(current, ideal, floors):
        step = max(min_step, math.floor(config.max_step_fraction * cur))
        target.append(max(low, min(max(want, cur - step), cur + step)))
    # Growth only into room left by the others (else the fit below would push a shrinking worker
    # past its own step): growers share the room in proportion to what they asked for.
    base = [max(min(t, cur), low) for t, cur, low in zip(target, current, floors)]
    growth = [t - b for t, b in zip(target, base)]
    room = budget - sum(base)
    if room < sum(growth):
        growth = _apportion(room, growth, ids)
    target = [b + x for b, x in zip(base, growth)]

    # 4. fit the budget: cut every part above its floor by the same fraction
    excess = sum(target) - budget
    if excess > 0:
        above = [t - f for t, f in zip(target, floors)]
        kept = _apportion(sum(above) - excess, above, ids)
        target = [f + k for f, k in zip(floors, kept)]
    return {wid: t * g for wid, t in zip(ids, target)}


def _demand(w: WorkerKVState, c: KVQuotaConfig) -> float:
    usage = w.used_blocks / w.quota_blocks if w.quota_blocks else (1.0 if w.used_blocks else 0.0)
    return (1.0 + c.demand_waiting_weight * w.num_waiting + c.demand_preemption_weight * w.num_preemptions
            + c.demand_usage_weight * min(usage, 1.0))


def _apportion(total: int, weights: Sequence[float], ids: Sequence[str]) -> list[int]:
    """Integer parts summing to ``total``, proportional to ``weights`` (largest remainder, ties by id).

    With integer weights and total <= sum(weights), no part exceeds its weight.
    """
    weight_sum = sum(weights)
    if total <= 0 or weight_sum <= 0:
        return [0] * len(weights)
    exact = [total * w / weight_sum for w in weights]
    parts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - parts[i]), ids[i]))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
