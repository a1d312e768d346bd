"""Block lifecycle: nothing leaks on finish or abort; cached blocks are reclaimable; KV events."""

from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, drain, make_engine, run_all
from workers.protocol import KVEventKind, SamplingParams
from workers.block_hash import block_hashes


def test_abort_everywhere_frees_blocks(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"), max_num_seqs=2)
    long = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, long)
    engine.step()
    engine.step()
    assert engine.stats().num_running == 2 and engine.stats().num_waiting == 3
    engine.add_request("pinned", PROMPTS[0], GREEDY, prefill_only=True)
    engine.reserve_import("imp", PROMPTS[1], GREEDY)
    for rid in ["r0", "r4", "pinned", "imp", "r2"]:  # running, waiting, pinned/queued, reserved, waiting
        assert engine.abort(rid)
    assert not engine.abort("r0")  # a second abort is a no-op
    drain(engine, {})
    assert_all_blocks_free(engine)


def test_cached_blocks_are_reclaimable(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"), num_kv_blocks=16, blocks_per_segment=16)
    run_all(engine, [list(range(1, 41))], prefix="a")  # leaves ~12 cached free blocks
    assert engine.stats().num_cached_free_blocks > 8
    # a request needing almost every block must evict cached ones, not fail or wait
    out = run_all(engine, [list(range(200, 250))], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), prefix="b")
    assert len(out["b0"]) == 8
    assert engine.stats().num_evictions > 0
    assert_all_blocks_free(engine)


def test_kv_events_match_block_hashes(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"), num_kv_blocks=16, blocks_per_segment=16)
    prompt = list(range(1, 23))  # 5 full blocks of 4, then 2 tokens
    run_all(engine, [prompt], SamplingParams(max_tokens=1, temperature=0))
    stored = [h for e in engine.take_kv_events() if e.kind == KVEventKind.STORED for h in e.block_hashes]
    assert stored[:5] == block_hashes(prompt, 4)
    run_all(engine, [list(range(100, 160))], SamplingParams(max_tokens=1, temperature=0), prefix="x")
    removed = [h for e in engine.take_kv_events() if e.kind == KVEventKind.REMOVED for h in e.block_hashes]
    assert set(stored[:5]) & set(removed), "evicting cached blocks must emit REMOVED events"
    events = engine.take_kv_events()
    assert events == []


def test_cache_salt_isolates_prefixes(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"))
    prompt = list(range(1, 30))
    run_all(engine, [prompt], GREEDY, prefix="a", cache_salt="tenant-a")
    hit0 = engine.stats().prompt_tokens_hit
    run_all(engine, [prompt], GREEDY, prefix="b", cache_salt="tenant-b")
    assert engine.stats().prompt_tokens_hit == hit0  # other salt: no sharing
    run_all(engine, [prompt], GREEDY, prefix="c", cache_salt="tenant-a")
    assert engine.stats().prompt_tokens_hit > hit0  # same salt: shared


def test_full_warm_up_runs_a_full_step_and_a_mixed_one_and_leaves_no_trace(tiny_checkpoint):
    """engine.warm_up: full (the default on CUDA) also runs a step whose two prompts fill the token
    budget and a step that mixes their decodes with a third prompt; afterwards the engine is as
    fresh as after the basic warm-up, and serves the same tokens."""
    basic = make_engine(tiny_checkpoint("llama"), warm_up="basic")
    full = make_engine(tiny_checkpoint("llama"), warm_up="full")
    assert full.num_warm_up_steps >= basic.num_warm_up_steps + 3
    s = full.stats()
    assert full.requests == {} and not full.has_work()
    assert (s.num_used_blocks, s.num_cached_free_blocks, s.num_evictions) == (0, 0, 0)
    assert (s.prompt_tokens_queried, s.prompt_tokens_hit, s.num_preemptions) == (0, 0, 0)
    assert full.take_kv_events() == [] and (full.num_overlapped_steps, full.num_dropped_tokens) == (0, 0)
    assert_all_blocks_free(full)
    assert run_all(full, PROMPTS) == run_all(basic, PROMPTS)


def test_start_up_request_leaves_no_trace(tiny_checkpoint):
    """Every engine runs one real request while it starts (a GPU's first prefill compiles its
    attention kernel there, not inside serving); afterwards nothing of it is visible: no request,
    no block used or cached, no KV event, no counter moved, and the first real request's prefix
    lookup finds nothing."""
    e = make_engine(tiny_checkpoint("llama"))
    assert e.num_warm_up_steps >= 2  # the prefill and the step that samples the second token
    s = e.stats()
    assert e.requests == {} and not e.has_work()
    assert (s.num_used_blocks, s.num_cached_free_blocks, s.num_evictions) == (0, 0, 0)
    assert (s.prompt_tokens_queried, s.prompt_tokens_hit, s.num_preemptions) == (0, 0, 0)
    assert e.take_kv_events() == []
    assert_all_blocks_free(e)
    prompt = list(range(1, 10))  # the start-up prompt's first tokens: two full blocks if it were cached
    assert e.num_cached_prompt_tokens(prompt) == 0
    run_all(e, [prompt])
    assert e.stats().prompt_tokens_hit == 0
