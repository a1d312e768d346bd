"""Async scheduling against the synchronous path on the same workloads: requests finishing at
different steps (length, stop tokens), aborts while a step is in flight, preemption, seeded
sampling, KV events, capacity limits; every block back in the pool at the end."""

import pytest

from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, collect, make_engine, run_all
from workers.engine.launched_step import LaunchedStep, LaunchedSteps
from workers.engine.device_transfer import DeviceMark
from workers.engine.request import Request
from workers.protocol import FinishReason, KVEventKind, SamplingParams


@pytest.fixture(scope="module", autouse=True)
def scheduling():
    """Every test here builds its engines in an explicit mode, sync next to async: run once, not
    once per suite-wide mode (conftest.py's `scheduling`, overridden here, would run each twice)."""
    return "explicit"


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy outputs of PROMPTS (12 tokens each) on a synchronous engine."""
    return run_all(make_engine(model_dir, async_scheduling=False), PROMPTS)


def both(model_dir, requests, **engine_kwargs):
    sync = make_engine(model_dir, async_scheduling=False, **engine_kwargs)
    asyn = make_engine(model_dir, async_scheduling=True, **engine_kwargs)
    a, b = collect(sync, requests), collect(asyn, requests)
    assert asyn.num_overlapped_steps > 0
    assert_all_blocks_free(sync)
    assert_all_blocks_free(asyn)
    return a, b, sync, asyn


def test_requests_finishing_at_different_steps(model_dir, reference):
    """max_tokens 1..12 and stop tokens at different positions, all in one batch."""
    reqs = {}
    for i, (p, n) in enumerate(zip(PROMPTS, [1, 2, 3, 7, 12])):
        reqs[f"len{i}"] = (p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    for i, (p, k) in enumerate(zip(PROMPTS, [0, 1, 4, 6, 10])):
        stop = reference[f"r{i}"][k]  # the greedy output's k-th token stops it (or an earlier copy)
        reqs[f"stop{i}"] = (p, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,)))
    sync, asyn, e_sync, e_async = both(model_dir, reqs, max_num_seqs=10)
    assert asyn == sync
    assert e_async.num_dropped_tokens > 0 and e_sync.num_dropped_tokens == 0  # stops took a slot in flight
    for i, n in enumerate([1, 2, 3, 7, 12]):
        assert sync[f"len{i}"] == (reference[f"r{i}"][:n], FinishReason.LENGTH, None)
    for i, k in enumerate([0, 1, 4, 6, 10]):
        tokens, reason, _ = sync[f"stop{i}"]
        assert reason == FinishReason.STOP and tokens == reference[f"r{i}"][:len(tokens)] and len(tokens) <= k + 1
    stored = lambda e: {h for ev in e.take_kv_events() if ev.kind == KVEventKind.STORED for h in ev.block_hashes}
    assert stored(e_async) == stored(e_sync)  # the dropped slots published nothing
    assert e_async.stats().prompt_tokens_hit == e_sync.stats().prompt_tokens_hit


def test_kv_events_identical_when_all_finish_by_length(model_dir):
    reqs = {f"r{i}": (p, SamplingParams(max_tokens=3 + 2 * i, temperature=0, ignore_eos=True))
            for i, p in enumerate(PROMPTS + [PROMPTS[2] + [1, 2]])}
    sync, asyn, e_sync, e_async = both(model_dir, reqs, num_kv_blocks=32, blocks_per_segment=16)
    assert asyn == sync
    # same events; within one (coalesced) event, blocks completed by a sampled token are
    # published when the token is read, so their order may differ
    events = [[(e.seq, e.kind, frozenset(e.block_hashes)) for e in engine.take_kv_events()] for engine in (e_sync, e_async)]
    assert events[0] == events[1] and any(kind == KVEventKind.REMOVED for _, kind, _ in events[0])


def test_outputs_come_one_step_later_and_has_work_covers_the_step_in_flight(model_dir):
    engine = make_engine(model_dir, async_scheduling=True)
    engine.add_request("a", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert engine.step().deltas == []  # prefill launched; its token is read by the next call
    second = engine.step().deltas
    assert [d.request_id for d in second] == ["a"] and not second[0].finished
    assert engine.requests["a"].num_pending == 1 and engine.has_work()  # its 2nd token is in flight
    last = engine.step().deltas  # the 2nd token is its last: retired, no 3rd step launched for it
    assert last[0].finish_reason == FinishReason.LENGTH and not engine.has_work()
    assert engine.num_overlapped_steps == 2
    assert_all_blocks_free(engine)


def test_abort_while_a_step_is_in_flight(model_dir, reference):
    engine = make_engine(model_dir, async_scheduling=True)
    out = {f"r{i}": [] for i in range(len(PROMPTS))}
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    for _ in range(4):
        for d in engine.step().deltas:
            out[d.request_id] += d.token_ids
    assert engine._in_flight is not None and engine.requests["r1"].num_pending == 1
    blocks = list(engine.requests["r1"].block_ids)
    assert engine.abort("r1")
    assert set(blocks) <= engine._launched.unsynced[-1].freed_blocks  # the queued step still writes them
    emitted = list(out["r1"])
    while engine.has_work():
        for d in engine.step().deltas:
            assert d.request_id != "r1", "aborted request emitted a token"
            out[d.request_id] += d.token_ids
    assert out["r1"] == emitted and emitted == reference["r1"][:len(emitted)]
    assert engine.num_dropped_tokens >= 1
    assert {k: v for k, v in out.items() if k != "r1"} == {k: v for k, v in reference.items() if k != "r1"}
    assert_all_blocks_free(engine)


def test_preemption_with_stops_and_lengths(model_dir, reference):
    reqs = {}
    for i, p in enumerate(PROMPTS):
        stop = (reference[f"r{i}"][5],) if i % 2 else ()
        reqs[f"r{i}"] = (p, SamplingParams(max_tokens=12 - i, temperature=0, ignore_eos=True, stop_token_ids=stop))
    sync, asyn, e_sync, e_async = both(model_dir, reqs, num_kv_blocks=12, blocks_per_segment=4, max_num_seqs=5)
    assert asyn == sync
    assert e_async.stats().num_preemptions > 0 and e_sync.stats().num_preemptions > 0


def test_seeded_sampling_and_logprobs_identical(model_dir):
    params = [
        SamplingParams(max_tokens=10, temperature=1.3, seed=11, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.8, top_k=5, seed=12, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=10, temperature=1.0, top_p=0.8, seed=13, ignore_eos=True, top_logprobs=3),
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=True),
        SamplingParams(max_tokens=9, temperature=2.0, top_k=20, top_p=0.9, seed=14, ignore_eos=True),
    ]
    reqs = {f"s{i}": (p, sp) for i, (p, sp) in enumerate(zip(PROMPTS, params))}
    sync_engine = make_engine(model_dir, async_scheduling=False)
    async_engine = make_engine(model_dir, async_scheduling=True)
    lp = {}
    for engine in (sync_engine, async_engine):
        for rid, (p, sp) in reqs.items():
            engine.add_request(rid, p, sp)
        got = {rid: ([], [], []) for rid in reqs}
        while engine.has_work():
            for d in engine.step().deltas:
                got[d.request_id][0].extend(d.token_ids)
                got[d.request_id][1].extend(d.logprobs or [])
                got[d.request_id][2].extend(d.top_logprobs or [])
        lp[engine.async_scheduling] = got
        assert_all_blocks_free(engine)
    assert lp[True] == lp[False]
    assert len(lp[True]["s1"][1]) == 8 and len(lp[True]["s2"][2]) == 10


def test_capacity_exhausted_after_a_pending_token(model_dir):
    """Alone with every block of the pool and still short: the pending token is emitted, then the
    error, as on the synchronous path."""
    reqs = {"big": (list(range(1, 11)), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))}
    sync, asyn, _, _ = both(model_dir, reqs, num_kv_blocks=4, blocks_per_segment=4)
    assert asyn == sync
    tokens, reason, error = sync["big"]
    assert reason == FinishReason.LENGTH and "KV blocks" in error and len(tokens) == 7  # 16 KV slots: 10 prompt + 6, sampling a 7th


def test_prefill_only_steps_are_resolved_at_once(model_dir):
    """Handles (and their blocks' KV) are handed out by the step that samples them, async or not."""
    engine = make_engine(model_dir, async_scheduling=True)
    engine.add_request("p", PROMPTS[2], GREEDY, prefill_only=True)
    handles = engine.step().handles
    assert [h.request_id for h in handles] == ["p"] and engine._in_flight is None
    assert engine.num_overlapped_steps == 0 and not engine.has_work()
    assert engine.release_handle("p")
    assert_all_blocks_free(engine)


def test_reserve_import_waits_only_for_blocks_a_queued_step_still_writes():
    """LaunchedSteps bookkeeping: freed blocks are remembered per unsynced step writing them."""
    waits = []

    class Mark(DeviceMark):
        def __init__(self, name):
            self.event, self.name = None, name

        def wait(self):
            waits.append(self.name)

    a, b = Request("a", [1, 2], GREEDY, 4), Request("b", [3, 4], GREEDY, 4)
    steps = LaunchedSteps()
    s1 = LaunchedStep({a, b}, [], None, Mark("s1"))
    s2 = LaunchedStep({b}, [], None, Mark("s2"))
    steps.add(s1)
    steps.add(s2)
    steps.released(a, [1, 2])
    steps.released(b, [7])
    steps.wait_for_blocks([5, 6])
    assert waits == []  # no overlap: nothing to wait for
    steps.wait_for_blocks([2, 9])
    assert waits == ["s1"] and steps.unsynced == [s2]  # s1 written a's blocks; s2 is still unsynced
    steps.wait_for_blocks([7])
    assert waits == ["s1", "s2"] and steps.unsynced == []
