"""Request priority (vLLM's: lower first): it orders admission, picks the preemption victim and
orders a decode worker's imports against its local prompts; outputs stay token-identical to
transformers' generate, and equal priorities keep first come, first served."""

import dataclasses

import pytest

from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, drain, hf_greedy, make_engine


def at(priority: int):
    return dataclasses.replace(GREEDY, priority=priority)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


def finish_order(engine, requests: dict[str, tuple[list[int], object]]) -> tuple[list[str], dict[str, list[int]]]:
    out = {rid: [] for rid in requests}
    for rid, (prompt, sp) in requests.items():
        engine.add_request(rid, prompt, sp)
    return [d.request_id for d in drain(engine, out)], out


def test_lower_priority_value_is_admitted_first(model_dir):
    """One sequence at a time: the request that arrived last with priority -1 runs first, the
    priority-1 ones last; equal priorities run in arrival order."""
    engine = make_engine(model_dir, max_num_seqs=1)
    requests = {"batch0": (PROMPTS[0], at(1)), "batch1": (PROMPTS[1], at(1)), "a": (PROMPTS[2], GREEDY),
                "b": (PROMPTS[3], GREEDY), "urgent": (PROMPTS[4], at(-1))}
    order, out = finish_order(engine, requests)
    assert order == ["urgent", "a", "b", "batch0", "batch1"]
    assert out == {rid: hf_greedy(model_dir, p, GREEDY.max_tokens) for rid, (p, _) in requests.items()}
    assert_all_blocks_free(engine)


def test_preemption_victim_is_the_lowest_priority(model_dir):
    """12 blocks of 4 tokens for three requests of 5 blocks each: the oldest running request has
    the highest priority value and is the one preempted (without priorities the newest would be),
    the two that came after it never are."""
    engine = make_engine(model_dir, num_kv_blocks=12, blocks_per_segment=4, max_num_seqs=4)
    prompts = {"low": PROMPTS[3], "hi0": PROMPTS[0], "hi1": PROMPTS[3][::-1]}
    out = {rid: [] for rid in prompts}
    engine.add_request("low", prompts["low"], at(5))
    reqs = {"low": engine.requests["low"]}
    for d in engine.step().deltas:
        out[d.request_id] += d.token_ids
    for rid in ("hi0", "hi1"):
        engine.add_request(rid, prompts[rid], GREEDY)
        reqs[rid] = engine.requests[rid]
    order = [d.request_id for d in drain(engine, out)]
    assert reqs["low"].num_preemptions > 0 and reqs["hi0"].num_preemptions == reqs["hi1"].num_preemptions == 0
    assert order[-1] == "low"
    assert out == {rid: hf_greedy(model_dir, p, GREEDY.max_tokens) for rid, p in prompts.items()}
    assert_all_blocks_free(engine)


def test_imports_and_local_requests_in_priority_then_arrival_order(model_dir):
    """A waiting import's blocks are held back from local requests that come after it: a higher
    priority value, or the same and arrived later; not from one with a lower value."""
    sch = make_engine(model_dir).scheduler
    sch.want_for_import("imp", 8, priority=0)
    since = sch.import_waits["imp"].since
    assert sch.blocks_wanted_by_imports(since + 1, 0) == 8  # same priority, arrived later
    assert sch.blocks_wanted_by_imports(since - 1, 0) == 0  # same priority, arrived before
    assert sch.blocks_wanted_by_imports(since - 1, 1) == 8  # arrived before, but a higher value
    assert sch.blocks_wanted_by_imports(since + 1, -1) == 0  # arrived later, but a lower value
    assert sch.blocks_wanted_by_imports() == 8
    sch.withdraw_import("imp")
