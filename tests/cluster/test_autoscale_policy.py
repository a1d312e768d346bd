"""Autoscaling policy (pure) on recorded and simulated metric sequences."""

import pytest
from pydantic import ValidationError

from cluster.autoscale_policy import AutoscalingConfig, MetricsSample, PoolBounds, ScaleDecision, decide
from workers.protocol import Role

P, D = Role.PREFILL, Role.DECODE
CFG = AutoscalingConfig(enabled=True)  # interval 10 s, cooldown 60 s, up window 30 s, down window 300 s
BOUNDS = {P: PoolBounds(1, 4), D: PoolBounds(1, 4)}


def simulate(trace, steps, start, config=CFG, bounds=BOUNDS):
    """Run the loop the manager runs: sample every interval, decide, apply. trace(now, replicas) -> sample."""
    history, last_change, replicas, changes = [], None, dict(start), []
    for i in range(steps):
        now = i * config.interval_s
        history.append(trace(now, dict(replicas)))
        d = decide(history, replicas, config, last_change, now, bounds)
        assert isinstance(d, ScaleDecision)
        for role in Role:
            assert bounds[role].min_replicas <= d.replicas(role) <= bounds[role].max_replicas
        if d.changed:
            changes.append((now, {r: d.replicas(r) - replicas[r] for r in Role}, d.reason))
            last_change, replicas = now, {P: d.prefill, D: d.decode}
    return replicas, changes


def reversals(changes, role):
    signs = [delta[role] for _, delta, _ in changes if delta[role]]
    return sum(1 for a, b in zip(signs, signs[1:]) if (a > 0) != (b > 0))


def test_scale_prefill_up_on_ttft_breach_until_it_clears():
    # TTFT falls as prefill replicas grow: 6 s, 3 s, 2 s (= target: no longer a breach).
    def trace(now, r):
        return MetricsSample(now, ttft_p90_s=6.0 / r[P], itl_p90_s=0.05, decode_kv_usage=0.5)

    replicas, changes = simulate(trace, 60, {P: 1, D: 1})
    assert replicas == {P: 3, D: 1}
    assert [delta for _, delta, _ in changes] == [{P: 1, D: 0}, {P: 1, D: 0}]
    assert changes[0][0] == 10  # two breaching samples (min_samples) are enough
    assert "prefill up: ttft_p90" in changes[0][2]
    assert changes[1][0] - changes[0][0] >= CFG.cooldown_s


def test_scale_down_when_idle_for_a_sustained_window():
    def idle(now, r):
        return MetricsSample(now)

    replicas, changes = simulate(idle, 70, {P: 3, D: 4})
    times = [t for t, _, _ in changes]
    assert times[0] >= CFG.scale_down_window_s  # never before idle has lasted the whole window
    assert all(b - a >= CFG.scale_down_window_s for a, b in zip(times, times[1:]))
    assert times == [300, 610]  # each change restarts the idle window (fresh samples only)
    assert replicas == {P: 1, D: 2}
    assert all(delta[P] <= 0 and delta[D] <= 0 for _, delta, _ in changes)
    replicas, _ = simulate(idle, 300, {P: 3, D: 4})
    assert replicas == {P: 1, D: 1}  # never below min_replicas


def test_no_flapping_on_an_oscillating_signal():
    # Overload / idle alternating every sample: the overload half breaches often enough to add
    # capacity (like an HPA on the mean), the idle half never lasts a window: only ever up, never back.
    def alternating(now, r):
        busy = (now // CFG.interval_s) % 2 == 0
        return MetricsSample(now, prefill_waiting=20 if busy else 0, ttft_p90_s=5.0 if busy else 0.1,
                             itl_p90_s=0.5 if busy else 0.01, decode_kv_usage=0.95 if busy else 0.1)

    replicas, changes = simulate(alternating, 200, {P: 2, D: 2})
    assert reversals(changes, P) == reversals(changes, D) == 0
    assert all(delta[P] >= 0 and delta[D] >= 0 for _, delta, _ in changes)
    assert replicas == {P: 4, D: 4}  # the trace ignores capacity, so it ends at max and stays

    # One spike per minute is not sustained: nothing moves, up or down.
    def spiky(now, r):
        spike = (now // CFG.interval_s) % 6 == 0
        return MetricsSample(now, ttft_p90_s=9.0 if spike else 0.1, itl_p90_s=9.0 if spike else 0.01)

    replicas, changes = simulate(spiky, 200, {P: 2, D: 2})
    assert changes == [] and replicas == {P: 2, D: 2}

    # Load that breaches on 1 replica and sits inside the hysteresis band on 2 (1.2 s: below the
    # 2 s target, above 0.5 * target): up once, then hold; never back down and up again.
    def banded(now, r):
        jitter = 0.2 if (now // CFG.interval_s) % 2 else -0.2
        return MetricsSample(now, ttft_p90_s=2.4 / r[P] + jitter, prefill_kv_usage=0.1)

    replicas, changes = simulate(banded, 200, {P: 1, D: 1})
    assert replicas[P] == 2 and len(changes) == 1 and reversals(changes, P) == 0


def test_decode_scales_up_on_itl_kv_pressure_or_queue():
    for sample in (dict(itl_p90_s=0.5), dict(decode_kv_usage=0.95), dict(decode_waiting=9)):
        d = decide([MetricsSample(t, **sample) for t in (80, 90, 100)], {P: 1, D: 2}, CFG, None, 100, BOUNDS)
        assert (d.prefill, d.decode, d.changed) == (1, 3, True), sample
        assert "decode up" in d.reason
    # 8 waiting on 2 replicas is exactly the limit (4 per replica): not a breach
    d = decide([MetricsSample(t, decode_waiting=8) for t in (80, 90, 100)], {P: 1, D: 2}, CFG, None, 100, BOUNDS)
    assert not d.changed


def test_respects_min_max_and_cooldown():
    breach = [MetricsSample(t, ttft_p90_s=9.0, itl_p90_s=9.0) for t in (80, 90, 100)]
    d = decide(breach, {P: 4, D: 4}, CFG, None, 100, BOUNDS)
    assert (d.prefill, d.decode, d.changed) == (4, 4, False) and "at max_replicas" in d.reason
    d = decide(breach, {P: 2, D: 2}, CFG, last_change_at=70, now=100, bounds=BOUNDS)
    assert not d.changed and "cooldown" in d.reason
    d = decide(breach, {P: 2, D: 2}, CFG, last_change_at=40, now=100, bounds=BOUNDS)
    assert (d.prefill, d.decode) == (3, 3)
    # Samples from before the last change do not count: only one fresh sample (< min_samples).
    d = decide(breach, {P: 2, D: 2}, CFG, last_change_at=95, now=160, bounds=BOUNDS)
    assert d.changed is False
    # Counts outside the bounds (e.g. bounds changed) are pulled back at once, cooldown or not.
    d = decide([], {P: 7, D: 0}, CFG, last_change_at=99, now=100, bounds=BOUNDS)
    assert (d.prefill, d.decode, d.changed) == (4, 1, True) and "clamped" in d.reason
    # A larger step still stops at max.
    d = decide(breach, {P: 3, D: 1}, CFG.model_copy(update={"scale_step": 3}), None, 100, BOUNDS)
    assert (d.prefill, d.decode) == (4, 4)


def test_idle_down_needs_room_on_the_remaining_replicas():
    cfg = CFG.model_copy(update={"kv_usage_low": 0.6})
    window = [MetricsSample(t, decode_kv_usage=0.5, prefill_kv_usage=0.2) for t in range(0, 310, 10)]
    d = decide(window, {P: 2, D: 2}, cfg, None, 300, BOUNDS)
    # decode at 0.5 on 2 replicas would be 1.0 on one: stays; prefill at 0.2 -> 0.4 on one: goes down
    assert (d.prefill, d.decode) == (1, 2)
    # The window must be covered: 200 s of idle history is not 300 s.
    d = decide(window[10:], {P: 2, D: 2}, cfg, None, 300, BOUNDS)
    assert not d.changed


def test_bad_inputs_and_config():
    with pytest.raises(ValueError, match="future"):
        decide([MetricsSample(101)], {P: 1, D: 1}, CFG, None, 100, BOUNDS)
    with pytest.raises(ValueError, match="decode"):
        decide([], {P: 1}, CFG, None, 100, BOUNDS)
    with pytest.raises(ValidationError, match="kv_usage_low"):
        AutoscalingConfig(kv_usage_low=0.9, kv_usage_high=0.8)
    with pytest.raises(ValidationError, match="cooldown"):
        AutoscalingConfig(cooldown=5)  # a typo is an error, not a silent default
    assert AutoscalingConfig().model_dump().keys() >= {"enabled", "interval_s", "cooldown_s", "ttft_p90_target_s",
                                                        "itl_p90_target_s"}
