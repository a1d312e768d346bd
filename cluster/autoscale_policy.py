"""Autoscaling policy: a pure function from recorded metrics to desired prefill/decode replica counts.

    decide(metrics_window, current_replicas, config, last_change_at, now, bounds) -> ScaleDecision

Signals per pool (prefill | decode):
    breach  TTFT p90 > target, or waiting per replica > queue_per_replica_high
            | ITL p90 > target, or KV usage > kv_usage_high, or waiting per replica > queue_per_replica_high
    idle    nothing waiting, latency p90 < scale_down_latency_ratio * target, KV usage < kv_usage_low,
            and the KV usage would stay below kv_usage_high with one replica fewer

Rules that keep it from flapping:
  * cooldown: no change within cooldown_s of the last one (either pool);
  * only samples taken after the last change count (they reflect the current replica count);
  * up: at least scale_up_breach_fraction of the samples in the last scale_up_window_s breach;
  * down: *every* sample over the last scale_down_window_s is idle, and fresh samples reach back to
    the window's start (so after any change, down waits a whole window);
  * hysteresis: "idle" needs latency well below the target (ratio < 1), so the band between
    ratio * target and target holds the current count;
  * one step (scale_step replicas) per decision, always within [min_replicas, max_replicas].
The loop that applies decisions (cluster manager) passes the time of its last applied change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.protocol import Role


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    interval_s: float = Field(10, gt=0, description="How often the loop samples metrics and decides")
    cooldown_s: float = Field(60, ge=0, description="No change within this long of the last one")
    ttft_p90_target_s: float = Field(2.0, gt=0)
    itl_p90_target_s: float = Field(0.2, gt=0)
    scale_up_window_s: float = Field(30, gt=0, description="Breaches are judged over this window")
    scale_up_breach_fraction: float = Field(0.6, gt=0, le=1, description="Share of breaching samples to scale up")
    scale_down_window_s: float = Field(300, gt=0, description="Idle must hold over this whole window")
    scale_down_latency_ratio: float = Field(0.5, gt=0, lt=1, description="Idle: latency p90 below ratio * target")
    min_samples: int = Field(2, ge=1, description="Fewest samples a window needs before acting")
    queue_per_replica_high: float = Field(4.0, gt=0, description="Waiting requests per replica that count as a breach")
    kv_usage_high: float = Field(0.9, gt=0, le=1, description="Decode KV usage that counts as a breach")
    kv_usage_low: float = Field(0.3, ge=0, lt=1, description="KV usage below which a pool may be idle")
    scale_step: int = Field(1, ge=1, description="Replicas added or removed per decision")

    @model_validator(mode="after")
    def _bands(self) -> "AutoscalingConfig":
        if self.kv_usage_low >= self.kv_usage_high:
            raise ValueError(f"kv_usage_low ({self.kv_usage_low}) must be < kv_usage_high ({self.kv_usage_high})")
        return self


@dataclass(frozen=True)
class MetricsSample:
    """Cluster metrics observed at one instant (``at``: unix seconds)."""

    at: float
    prefill_waiting: int = 0  # requests queued in the prefill pool
    decode_waiting: int = 0  # requests queued in the decode pool
    ttft_p90_s: float | None = None  # over the last interval; None = no requests finished a first token
    itl_p90_s: float | None = None
    prefill_kv_usage: float = 0.0  # used / total KV blocks over the pool, 0..1
    decode_kv_usage: float = 0.0


class ReplicaBounds(Protocol):
    """Anything with min/max replicas (cluster.config.PoolConfig fits)."""

    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class PoolBounds:
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class ScaleDecision:
    prefill: int  # desired replicas
    decode: int
    reason: str  # human-readable, one clause per pool
    changed: bool = False  # differs from the current counts

    def replicas(self, role: Role) -> int:
        return self.prefill if role is Role.PREFILL else self.decode


def decide(metrics_window: Sequence[MetricsSample], current_replicas: Mapping[Role, int], config: AutoscalingConfig,
           last_change_at: float | None, now: float, bounds: Mapping[Role, ReplicaBounds]) -> ScaleDecision:
    """Desired replicas per pool. ``metrics_window`` should span at least scale_down_window_s."""
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now}")
    for role in Role:
        if role not in current_replicas or role not in bounds:
            raise ValueError(f"current_replicas and bounds need an entry for {role.value}")
        if current_replicas[role] < 0:
            raise ValueError(f"{role.value} replicas must be >= 0, got {current_replicas[role]}")
        if bounds[role].min_replicas > bounds[role].max_replicas:
            raise ValueError(f"{role.value} bounds: min_replicas > max_replicas")
    samples = sorted(metrics_window, key=lambda s: s.at)
    if samples and samples[-1].at > now:
        raise ValueError(f"a metrics sample is from the future (at={samples[-1].at} > now={now})")

    current = {r: current_replicas[r] for r in Role}
    clamped = {r: min(max(current[r], bounds[r].min_replicas), bounds[r].max_replicas) for r in Role}
    if clamped != current:
        return _result(clamped, current, "clamped to [min_replicas, max_replicas]")
    if last_change_at is not None and now - last_change_at < config.cooldown_s:
        left = config.cooldown_s - (now - last_change_at)
        return _result(current, current, f"cooldown ({left:.0f}s left)")

    # Only what was observed with the current replica counts counts.
    fresh = [s for s in samples if last_change_at is None or s.at > last_change_at]
    up = [s for s in fresh if s.at > now - config.scale_up_window_s]
    down = [s for s in fresh if s.at >= now - config.scale_down_window_s]
    # Idle is sustained only if fresh observation reaches back to the window's start.
    down_covered = len(down) >= config.min_samples and fresh[0].at <= now - config.scale_down_window_s
    target, reasons = dict(current), []
    for role in Role:
        n, b = current[role], bounds[role]
        breaches = [s for s in up if _breach(role, s, n, config)]
        if len(up) >= config.min_samples and len(breaches) >= config.scale_up_breach_fraction * len(up):
            if n < b.max_replicas:
                target[role] = min(n + config.scale_step, b.max_replicas)
                reasons.append(f"{role.value} up: {_breach(role, breaches[-1], n, config)} "
                               f"in {len(breaches)}/{len(up)} samples")
            else:
                reasons.append(f"{role.value} at max_replicas despite breach")
        elif down_covered and n > b.min_replicas and all(_idle(role, s, n, config) for s in down):
            target[role] = max(n - config.scale_step, b.min_replicas)
            reasons.append(f"{role.value} down: idle for {now - down[0].at:.0f}s")
        else:
            reasons.append(f"{role.value} hold")
    return _result(target, current, "; ".join(reasons))


def _breach(role: Role, s: MetricsSample, replicas: int, c: AutoscalingConfig) -> str:
    """Why this sample breaches for ``role`` ('' if it does not)."""
    if role is Role.PREFILL:
        waiting, latency, target, name = s.prefill_waiting, s.ttft_p90_s, c.ttft_p90_target_s, "ttft_p90"
    else:
        waiting, latency, target, name = s.decode_waiting, s.itl_p90_s, c.itl_p90_target_s, "itl_p90"
        if s.decode_kv_usage > c.kv_usage_high:
            return f"decode kv_usage {s.decode_kv_usage:.2f} > {c.kv_usage_high}"
    if latency is not None and latency > target:
        return f"{name} {latency:.3g}s > {target}s"
    if waiting > c.queue_per_replica_high * replicas:
        return f"{waiting} waiting > {c.queue_per_replica_high:g} per replica x {replicas}"
    return ""


def _idle(role: Role, s: MetricsSample, replicas: int, c: AutoscalingConfig) -> bool:
    if role is Role.PREFILL:
        waiting, latency, target, usage = s.prefill_waiting, s.ttft_p90_s, c.ttft_p90_target_s, s.prefill_kv_usage
    else:
        waiting, latency, target, usage = s.decode_waiting, s.itl_p90_s, c.itl_p90_target_s, s.decode_kv_usage
    # The same load on one replica fewer must not itself be a breach (else down, then up again).
    projected_usage = usage * replicas / (replicas - 1) if replicas > 1 else math.inf if usage > 0 else 0.0
    return (waiting == 0
            and (latency is None or latency < c.scale_down_latency_ratio * target)
            and usage < c.kv_usage_low
            and projected_usage < c.kv_usage_high)


def _result(target: Mapping[Role, int], current: Mapping[Role, int], reason: str) -> ScaleDecision:
    return ScaleDecision(prefill=target[Role.PREFILL], decode=target[Role.DECODE], reason=reason,
                         changed=dict(target) != dict(current))
