"""Conditional disaggregation on estimated TTFT (pure): the estimate, the choice, the TPOT cap,
the config's modes, and the learned prefill rates."""

import pydantic
import pytest

from router.config import RouterConfig
from router.policy import RoundRobin, estimate_ttft, plan_route
from router.prefill_rates import PrefillRates
from workers.protocol import Role, WorkerLoad


def decode(wid, pending=0, running=0):
    return WorkerLoad(wid, Role.DECODE, running, 0, 0, 512, num_pending_prefill_tokens=pending)


def prefill(wid, pending=0, waiting=0):
    return WorkerLoad(wid, Role.PREFILL, 0, waiting, 0, 512, num_pending_prefill_tokens=pending)


def ttft_config(**kw):
    base = dict(policy="kv_aware", local_prefill_threshold_tokens=0, conditional_disaggregation="ttft",
                local_prefill_max_pending_tokens=4096, ttft_transfer_allowance_s=0.01,
                prefill_rate_prior_tokens_per_s=10000, local_prefill_rate_prior_tokens_per_s=2000)
    return RouterConfig(**(base | kw))


def test_estimate_is_pending_plus_prompt_over_rate():
    e = estimate_ttft(decode("d", pending=600), 400, 2000.0, prefill("p", pending=9000), 1000, 10000.0,
                      transfer_allowance_s=0.01, local_max_pending_tokens=1000, block_size=16)
    # local: (600 + 400) / 2000 = 0.5 s; remote: (9000 + 1000) / 10000 + 0.01 = 1.01 s
    assert (e.local_pending_tokens, e.remote_pending_tokens) == (1000, 10000)
    assert e.local_s == pytest.approx(0.5) and e.remote_s == pytest.approx(1.01)
    assert e.local_allowed and e.prefers_local and e.remote_because is None
    # one token over the cap: the decode worker's TPOT wins over this prompt's TTFT
    e = estimate_ttft(decode("d", pending=601), 400, 2000.0, prefill("p", pending=9000), 1000, 10000.0,
                      transfer_allowance_s=0.01, local_max_pending_tokens=1000, block_size=16)
    assert not e.local_allowed and not e.prefers_local and e.remote_because == "over_cap"
    with pytest.raises(ValueError, match="rates"):
        estimate_ttft(decode("d"), 1, 0.0, prefill("p"), 1, 1.0, transfer_allowance_s=0, local_max_pending_tokens=1,
                      block_size=16)
    with pytest.raises(ValueError):
        estimate_ttft(decode("d"), -1, 1.0, prefill("p"), 1, 1.0, transfer_allowance_s=0, local_max_pending_tokens=1,
                      block_size=16)


def test_idle_prefill_worker_keeps_the_prompt_disaggregated():
    # 512 uncached tokens: remote 512/10000 + 0.01 = 0.061 s; local 512/2000 = 0.256 s
    plan = plan_route(512, 16, [decode("d1")], [prefill("p1")], {}, ttft_config())
    assert plan.reason == "disaggregated" and plan.prefill.worker_id == "p1"
    assert plan.ttft.remote_s == pytest.approx(0.0612) and plan.ttft.local_s == pytest.approx(0.256)
    assert plan.num_remote_uncached_tokens == 512


def test_busy_prefill_worker_sends_the_prompt_to_its_decode_worker():
    # 8000 tokens queued on p1: remote (8000+512)/10000 + 0.01 = 0.86 s > local 0.256 s
    plan = plan_route(512, 16, [decode("d1")], [prefill("p1", pending=8000)], {}, ttft_config())
    assert (plan.reason, plan.prefill, plan.num_uncached_tokens) == ("ttft_local", None, 512)
    assert plan.prefill_locally and plan.ttft.prefers_local
    # ...unless the decode worker already has too much to prefill (the TPOT cap), however slow p1 is
    plan = plan_route(512, 16, [decode("d1", pending=3600)], [prefill("p1", pending=80000)], {}, ttft_config())
    assert plan.reason == "disaggregated" and not plan.ttft.local_allowed
    # a long decode-side queue is slower than a short prefill-side one: (1500+512)/2000 > (8000+512)/10000
    plan = plan_route(512, 16, [decode("d1", pending=1500)], [prefill("p1", pending=8000)], {}, ttft_config())
    assert plan.reason == "disaggregated" and plan.ttft.local_s > plan.ttft.remote_s
    assert plan.ttft.remote_because == "slower"


def test_decode_worker_short_of_kv_blocks_keeps_the_prompt_disaggregated():
    # local would win on time (0.256 s vs 0.86 s), but the prompt's 32 blocks are not free on d1:
    # it would wait there behind the imports, which get freed blocks first
    busy = [prefill("p1", pending=8000)]
    short = WorkerLoad("d1", Role.DECODE, 4, 0, 512 - 31, 512)
    plan = plan_route(512, 16, [short], busy, {}, ttft_config())
    assert plan.reason == "disaggregated" and not plan.ttft.local_allowed and plan.ttft.local_free_blocks == 31
    assert plan.ttft.remote_because == "short_of_blocks"
    assert plan.ttft.local_s < plan.ttft.remote_s
    # the pending local prefill counts too: 16 blocks free, 256 pending + 256 new = 32 blocks
    plan = plan_route(256, 16, [WorkerLoad("d1", Role.DECODE, 4, 1, 512 - 16, 512, num_pending_prefill_tokens=256)],
                      busy, {}, ttft_config())
    assert plan.reason == "disaggregated" and plan.ttft.local_pending_tokens == 512
    plan = plan_route(512, 16, [WorkerLoad("d1", Role.DECODE, 4, 0, 512 - 32, 512)], busy, {}, ttft_config())
    assert plan.reason == "ttft_local" and plan.ttft.local_free_blocks == 32


def test_round_robin_cycle_moves_only_for_prompts_sent_to_a_prefill_worker():
    rr = RoundRobin()
    prefills = [prefill("p1"), prefill("p2")]
    config = ttft_config(policy="round_robin")
    assert plan_route(512, 16, [decode("d1")], prefills, {}, config, round_robin=rr).prefill.worker_id == "p1"
    # kept local (busy prefill workers): the cycle stays where it was
    busy = [prefill("p1", pending=80000), prefill("p2", pending=80000)]
    assert plan_route(512, 16, [decode("d1")], busy, {}, config, round_robin=rr).reason == "ttft_local"
    assert plan_route(512, 16, [decode("d1")], prefills, {}, config, round_robin=rr).prefill.worker_id == "p2"
    assert plan_route(512, 16, [decode("d1")], prefills, {}, config, round_robin=rr).prefill.worker_id == "p1"


def test_learned_rates_override_the_priors_and_cached_prefixes_count():
    prefills, decodes = [prefill("p1", pending=2000)], [decode("d1")]
    # priors: remote (2000+512)/10000 + 0.01 = 0.26 s vs local 0.256 s: local, barely
    assert plan_route(512, 16, decodes, prefills, {}, ttft_config()).reason == "ttft_local"
    # p1 measured twice as fast: remote 0.136 s
    plan = plan_route(512, 16, decodes, prefills, {}, ttft_config(), prefill_rates={"p1": 20000.0})
    assert plan.reason == "disaggregated" and plan.ttft.remote_rate_tokens_per_s == 20000.0
    # p1 caches 24 of the 32 blocks: it computes only 128 tokens (0.222 s), the decode worker all 512
    plan = plan_route(512, 16, decodes, prefills, {"p1": 24}, ttft_config())
    assert plan.reason == "disaggregated" and plan.num_remote_uncached_tokens == 128
    assert plan.ttft.remote_pending_tokens == 2128 and plan.ttft.local_pending_tokens == 512
    # d1 caches 24 blocks: 128 uncached there (0.064 s) -> local
    plan = plan_route(512, 16, decodes, prefills, {"d1": 24}, ttft_config())
    assert plan.reason == "ttft_local" and plan.num_uncached_tokens == 128


def test_other_rules_still_come_first_and_other_modes_give_no_estimate():
    # the short-tail rule fires before any estimate
    plan = plan_route(20, 16, [decode("d1")], [prefill("p1")], {}, ttft_config(local_prefill_threshold_tokens=32))
    assert plan.reason == "uncached_below_threshold" and plan.ttft is None
    plan = plan_route(512, 16, [decode("d1")], [prefill("p1", pending=8000)], {},
                      RouterConfig(policy="kv_aware", local_prefill_threshold_tokens=0))
    assert plan.reason == "disaggregated" and plan.ttft is None  # off: pending tokens ignored


def test_config_modes_are_backward_compatible():
    assert RouterConfig().conditional_mode == "off"
    assert RouterConfig(prefill_queue_threshold=4).conditional_mode == "queue"  # as before the field
    assert RouterConfig(conditional_disaggregation="queue", prefill_queue_threshold=2).conditional_mode == "queue"
    # configs travel as dicts (Serve replicas, attach_ingress, --set): a dumped default config with
    # the threshold set afterwards still means queue, not a conflict
    raw = RouterConfig().model_dump() | {"prefill_queue_threshold": 4}
    assert RouterConfig(**raw).conditional_mode == "queue"
    assert RouterConfig(**RouterConfig(conditional_disaggregation="ttft").model_dump()).conditional_mode == "ttft"
    with pytest.raises(pydantic.ValidationError, match="needs prefill_queue_threshold"):
        RouterConfig(conditional_disaggregation="queue")
    with pytest.raises(pydantic.ValidationError, match="applies only to"):
        RouterConfig(conditional_disaggregation="ttft", prefill_queue_threshold=4)
    with pytest.raises(pydantic.ValidationError):
        RouterConfig(conditional_disaggregation="always")


def test_prefill_rates_learn_from_busy_intervals_only():
    rates = PrefillRates(window_s=1.0)
    prior = 1000.0
    assert rates.rate("p", prior).tokens_per_s == prior and not rates.rate("p", prior).is_measured
    rates.observe("p", 0.0, 0, 0, prior)
    # idle -> idle while admitting 100 tokens/s: that is its arrival rate, not its capacity
    rates.observe("p", 1.0, 100, 0, prior)
    assert not rates.rate("p", prior).is_measured
    # busy at both ends, 5000 tokens/s for many polls: the average converges from the prior to it
    t, n = 1.0, 100
    rates.observe("p", t, n, 500, prior)
    for _ in range(50):
        t, n = t + 0.1, n + 500
        rates.observe("p", t, n, 800, prior)
    r = rates.rate("p", prior)
    assert r.is_measured and r.tokens_per_s == pytest.approx(5000, rel=0.01)
    # drained at the end, 2000 tokens/s: a lower bound below the estimate changes nothing
    rates.observe("p", t + 0.1, n + 200, 0, prior)
    assert rates.rate("p", prior).tokens_per_s == pytest.approx(5000, rel=0.01)
    # a restarted worker (counter back to 0) is no sample; forget() drops what was learned
    rates.observe("p", t + 0.2, 0, 100, prior)
    assert rates.rate("p", prior).tokens_per_s == pytest.approx(5000, rel=0.01)
    rates.forget("p")
    assert rates.rate("p", prior).tokens_per_s == prior


def test_prefill_rates_take_drained_intervals_as_lower_bounds():
    rates = PrefillRates(window_s=0.5)
    rates.observe("d", 0.0, 0, 0, 100.0)
    # 400 tokens admitted and all computed within 0.2 s: at least 2000 tokens/s, far above the prior
    rates.observe("d", 0.2, 400, 0, 100.0)
    r = rates.rate("d", 100.0)
    assert r.is_measured and 100.0 < r.tokens_per_s < 2000.0  # moved towards it by one EWMA step
    before = r.tokens_per_s
    rates.observe("d", 0.4, 800, 0, 100.0)
    assert rates.rate("d", 100.0).tokens_per_s > before
    with pytest.raises(ValueError):
        PrefillRates(window_s=0)


def test_prefill_rates_outvote_a_wrong_prior_within_a_burst():
    """A prior 12x too high (a GPU figure on a CPU box): after 2 s of busy polls at 4000 tokens/s the
    estimate is under 2x the truth, after 6 s within 10 %: a burst of a few seconds corrects it."""
    rates, prior = PrefillRates(window_s=2.0), 50000.0
    t, n = 0.0, 0
    rates.observe("p", t, n, 100, prior)
    for i in range(60):
        t, n = t + 0.1, n + 400
        rates.observe("p", t, n, 100, prior)
        if i == 19:
            assert rates.rate("p", prior).tokens_per_s < 8000
    assert rates.rate("p", prior).tokens_per_s == pytest.approx(4000, rel=0.1)
