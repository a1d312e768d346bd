"""The serving benchmark's pure parts: seeded workloads (reproducible, open-loop arrivals, multi-turn
prefix structure) and the summary (percentiles, DistServe goodput)."""

import pytest

from benchmarks.serve_client import RequestResult
from benchmarks.serve_clusters import pool_overrides
from benchmarks.serve_stats import max_rate_at_attainment, percentile, summarize
from benchmarks.serve_workloads import WorkloadShape, build_workload

TOKENS = (10, 370)
CHAT = WorkloadShape(prompt_tokens=0, output_tokens=8, system_tokens=32, user_tokens=6, num_turns=3)


def test_workloads_are_reproducible_and_rate_only_moves_arrivals():
    shape = WorkloadShape(prompt_tokens=64, output_tokens=4)
    a = build_workload("prefill_heavy", shape, 20, 2.0, seed=7, token_range=TOKENS)
    assert a == build_workload("prefill_heavy", shape, 20, 2.0, seed=7, token_range=TOKENS)
    b = build_workload("prefill_heavy", shape, 20, 8.0, seed=7, token_range=TOKENS)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert [r.arrival_s for r in a] != [r.arrival_s for r in b]
    assert a != build_workload("prefill_heavy", shape, 20, 2.0, seed=8, token_range=TOKENS)
    for r in a:
        assert 48 <= len(r.prompt_token_ids) <= 80 and 3 <= r.max_tokens <= 5
        assert all(TOKENS[0] <= t < TOKENS[1] for t in r.prompt_token_ids)


def test_poisson_arrivals_have_the_asked_rate():
    reqs = build_workload("decode_heavy", WorkloadShape(8, 8), 4000, 5.0, seed=1, token_range=TOKENS)
    times = [r.arrival_s for r in reqs]
    assert times[0] == 0 and times == sorted(times)
    assert 4.7 < (len(times) - 1) / times[-1] < 5.3  # mean gap 1/rate (seeded: deterministic)


def test_each_turn_extends_the_previous_turn_of_its_conversation():
    reqs = build_workload("multi_turn", CHAT, 10, 1.0, seed=3, token_range=TOKENS)
    assert len(reqs) == 10
    by_conv = {}
    for r in reqs:
        by_conv.setdefault(r.conversation, []).append(r)
    assert len(by_conv) == 4  # ceil(10 / 3 turns)
    system = reqs[0].prompt_token_ids[:32]
    for turns in by_conv.values():
        assert [t.turn for t in turns] == list(range(len(turns)))
        assert all(t.prompt_token_ids[:32] == system for t in turns)  # one system prompt for all
        for prev, cur in zip(turns, turns[1:]):
            # [prev prompt | reply (max_tokens of prev) | new user message]
            assert cur.prompt_token_ids[:len(prev.prompt_token_ids)] == prev.prompt_token_ids
            grown = len(cur.prompt_token_ids) - len(prev.prompt_token_ids)
            assert prev.max_tokens + 4 <= grown <= prev.max_tokens + 8
            assert cur.index // 4 == prev.index // 4 + 1  # turn-major: rounds of one turn per conversation
    # each round in its own order (a fixed order would let round-robin keep conversations in place)
    assert [r.conversation for r in reqs[:4]] != [r.conversation for r in reqs[4:8]]


def test_each_conversation_has_its_own_long_context_after_the_system_prompt():
    shape = WorkloadShape(prompt_tokens=0, output_tokens=4, system_tokens=16, context_tokens=200, user_tokens=4,
                          num_turns=2)
    reqs = build_workload("multi_turn", shape, 8, 1.0, seed=5, token_range=TOKENS)
    first = [r for r in reqs if r.turn == 0]
    assert len(first) == 4 and len({r.prompt_token_ids[:16] for r in first}) == 1  # one system prompt
    contexts = {r.prompt_token_ids[16:166] for r in first}
    assert len(contexts) == 4  # a context of its own per conversation
    for r in first:
        assert 150 + 16 + 3 <= len(r.prompt_token_ids) <= 250 + 16 + 5  # system + context (+-25 %) + user
    for r in reqs:
        if r.turn == 1:
            prev = next(p for p in first if p.conversation == r.conversation)
            assert r.prompt_token_ids[:len(prev.prompt_token_ids)] == prev.prompt_token_ids


def result(i, ttft, tpot, n=5, ok=True, sent=0.0):
    e2e = ttft + tpot * (n - 1)
    return RequestResult(i, sent, sent_s=sent, ok=ok, ttft_s=ttft, e2e_s=e2e, finished_s=sent + e2e,
                         num_prompt_tokens=100, num_cached_tokens=25, num_output_tokens=n,
                         itl_s=[tpot] * (n - 1), error=None if ok else "boom")


def test_goodput_needs_both_targets_and_success():
    rs = [result(0, 0.1, 0.01), result(1, 0.1, 0.05, sent=1.0),  # TPOT over target
          result(2, 0.5, 0.01, sent=2.0),  # TTFT over target
          result(3, 0.1, 0.01, ok=False, sent=3.0), result(4, 0.2, 0.02, sent=3.5)]
    s = summarize(rs, ttft_slo_s=0.3, itl_slo_s=0.03)
    duration = 3.5 + 0.2 + 0.02 * 4
    assert s["num_ok"] == 4 and s["num_failed"] == 1 and s["errors"] == ["boom"]
    assert s["duration_s"] == pytest.approx(duration, abs=1e-3)
    assert s["goodput_rps"] == pytest.approx(2 / duration, abs=1e-4)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["throughput_tok_s"] == pytest.approx(4 * 5 / duration, abs=0.01)
    assert s["prefix_hit_rate"] == pytest.approx(0.25)
    assert s["ttft_p50_s"] == pytest.approx(0.15) and s["itl_p50_s"] == pytest.approx(0.015)
    # DistServe's SLO scale: both targets scaled; scale 1 is slo_attainment itself
    by_scale = s["slo_attainment_by_scale"]
    assert by_scale["1.0"] == s["slo_attainment"]
    assert (by_scale["0.2"], by_scale["0.4"], by_scale["1.5"]) == (0.0, pytest.approx(1 / 5), pytest.approx(2 / 5))
    # the stricter reading: every gap of the stream within the ITL target (a stall the TPOT averages away)
    assert s["slo_attainment_itl"] == pytest.approx(2 / 5)
    stall = result(5, 0.1, 0.01, n=21, sent=3.6)
    stall.itl_s[7] = 0.1  # one 100 ms stall among 20 gaps: TPOT 14.5 ms meets 30 ms, the stream does not
    s2 = summarize(rs + [stall], ttft_slo_s=0.3, itl_slo_s=0.03)
    assert s2["slo_attainment"] == pytest.approx(3 / 6) and s2["slo_attainment_itl"] == pytest.approx(2 / 6, abs=1e-4)
    assert s2["goodput_itl_rps"] < s2["goodput_rps"]
    with pytest.raises(ValueError):
        summarize(rs, 0, 1)


def test_percentile_and_max_rate():
    assert percentile([3, 1, 2, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 50) is None
    rows = [{"rate": 1, "slo_attainment": 1.0}, {"rate": 2, "slo_attainment": 0.95},
            {"rate": 4, "slo_attainment": 0.5}]
    assert max_rate_at_attainment(rows) == 2 and max_rate_at_attainment(rows, 0.99) == 1
    assert max_rate_at_attainment(rows[2:]) is None
    rows = [dict(r, slo_attainment_itl=a) for r, a in zip(rows, (0.95, 0.5, 0.1))]
    assert max_rate_at_attainment(rows, key="slo_attainment_itl") == 1


def test_colocated_has_the_same_workers_and_no_prefill_pool():
    from cluster.config import load_config

    for mode, prefill, decode in (("disaggregated", 1, 2), ("colocated", 0, 3)):
        c = load_config(None, pool_overrides(mode, 1, 2, 0.5))
        assert (c.pools.prefill.replicas, c.pools.decode.replicas) == (prefill, decode)
        assert c.router.min_prefill_workers == prefill and c.pools.decode.num_gpus == 0.5
    with pytest.raises(ValueError):
        pool_overrides("hybrid", 1, 1, 0)
