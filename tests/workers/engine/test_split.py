"""The disaggregation split points: prefill in engine A, copy the handle's blocks into engine B
(same process), decode in B: token-identical to A alone."""

import pytest

from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, drain, make_engine, run_all
from workers.engine import scheduler as scheduler_module
from workers.engine.block_pool import NoFreeBlocks
from workers.engine.request import RequestStatus
from workers.protocol import FinishReason, SamplingParams


def transfer(a, b, handle, prompt, sampling=GREEDY):
    """What a transceiver does, in-process: reserve on B, copy the blocks B lacks, commit."""
    res = b.reserve_import(handle.request_id, prompt, sampling)
    n = res.num_local_cached_blocks
    b.kv_cache.write_blocks(list(res.block_ids[n:]), a.kv_cache.read_blocks(list(handle.block_ids[n:])))
    assert a.release_handle(handle.request_id)
    return b.commit_import(handle.request_id, handle=handle)


def prefill(a, prompts, sampling=GREEDY, prefix="r"):
    for i, p in enumerate(prompts):
        a.add_request(f"{prefix}{i}", p, sampling, prefill_only=True)
    handles = []
    while a.has_work():
        out = a.step()
        assert not out.deltas
        handles += out.handles
    return {h.request_id: h for h in handles}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_on_a_decode_on_b(tiny_checkpoint, family):
    model_dir = tiny_checkpoint(family)
    colocated = run_all(make_engine(model_dir), PROMPTS)
    a = make_engine(model_dir, worker_id="A")
    b = make_engine(model_dir, worker_id="B", blocks_per_segment=8)  # different addressing, same KV meaning
    assert a.layout.compat_hash() == b.layout.compat_hash()
    handles = prefill(a, PROMPTS)
    assert a.stats().num_pinned == len(PROMPTS) and a.stats().num_pinned_blocks > 0
    out = {}
    for i, p in enumerate(PROMPTS):
        h = handles[f"r{i}"]
        assert h.num_tokens == len(p) and len(h.block_ids) == -(-len(p) // 4)
        first = transfer(a, b, h, p)
        out[f"r{i}"] = list(first.token_ids)
    drain(b, out)
    assert out == colocated
    assert_all_blocks_free(a)
    assert_all_blocks_free(b)


def test_import_reuses_local_prefix_cache(tiny_checkpoint):
    model_dir = tiny_checkpoint("llama")
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    prompt = list(range(40, 70))
    run_all(b, [prompt + [1]], prefix="warm")  # B now caches the prompt's first 7 blocks
    h = prefill(a, [prompt + [2, 3]])["r0"]
    res = b.reserve_import("r0", prompt + [2, 3], GREEDY)
    assert res.num_local_cached_blocks == 7  # only the 8th (partial) block needs to travel
    assert len(res.block_ids) == len(h.block_ids) == 8
    b.abort("r0")
    a.release_handle("r0")
    assert_all_blocks_free(a)
    assert_all_blocks_free(b)


def test_first_token_can_finish_the_request(tiny_checkpoint):
    """A prefill whose first token ends the request (max_tokens 1, a stop token): its handle is
    final, the prefill engine already freed (and cached) the blocks, and the decode engine reports
    the token without taking a block (finish_import): no KV to move."""
    model_dir = tiny_checkpoint("llama")
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    one = SamplingParams(max_tokens=1, temperature=0)
    h = prefill(a, [PROMPTS[0]], one)["r0"]
    assert h.final and h.block_ids == () and a.stats().num_pinned == 0 and not a.requests
    first = b.finish_import("r0", PROMPTS[0], one, h)
    assert first.finish_reason == FinishReason.LENGTH and first.token_ids == (h.first_token_id,)
    stop = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(h.first_token_id,))
    h2 = prefill(a, [PROMPTS[0]], stop, prefix="s")["s0"]
    assert h2.final and h2.num_cached_tokens == 4  # the first prefill's full block stayed cached
    first = b.finish_import("s0", PROMPTS[0], stop, h2)
    assert first.finish_reason == FinishReason.STOP and first.token_ids == (h.first_token_id,)
    assert not b.has_work()
    assert_all_blocks_free(a)
    assert_all_blocks_free(b)
    assert b.stats().num_free_blocks == b.stats().num_total_blocks and b.stats().num_cached_free_blocks == 0


def test_seeded_sampling_same_when_split(tiny_checkpoint):
    model_dir = tiny_checkpoint("qwen2")
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    colocated = run_all(make_engine(model_dir), [PROMPTS[2]], sp)
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    h = prefill(a, [PROMPTS[2]], sp)["r0"]
    out = {"r0": list(transfer(a, b, h, PROMPTS[2], sp).token_ids)}
    drain(b, out)
    assert out == colocated


def test_waiting_import_goes_before_new_local_requests(tiny_checkpoint, monkeypatch):
    """An import that found too few free blocks keeps the blocks it asked for from new local
    admissions until it reserves them: the local request that would fit in the free blocks waits,
    the import is served first, and both finish token-identical to colocated runs. One that
    arrived before the import began waiting goes first. A wait that stops being asked for lapses;
    abort() withdraws it at once."""
    model_dir = tiny_checkpoint("llama")
    long_local, imported, short_local = list(range(30, 66)), list(range(100, 132)), [7, 8, 9, 10, 11, 12, 13, 14]
    colocated = run_all(make_engine(model_dir), [long_local, imported, short_local])
    a = make_engine(model_dir, worker_id="A")
    b = make_engine(model_dir, worker_id="B", num_kv_blocks=16, blocks_per_segment=16)  # 16 blocks of 4 tokens
    handle = prefill(a, [imported])["r0"]
    out = {"r0": [], "r1": [], "r2": []}
    b.add_request("r0", long_local, GREEDY)  # 9 blocks now, up to 12
    for d in b.step().deltas:
        out[d.request_id] += d.token_ids
    with pytest.raises(NoFreeBlocks):
        b.reserve_import("r1", imported, GREEDY)  # 8 blocks, 7 free
    b.add_request("r2", short_local, GREEDY)  # 2 blocks: would fit, but the import asked first
    assert (b.stats().num_waiting_imports, b.stats().num_import_waits) == (1, 1)
    res = None
    while res is None:
        assert b.requests["r2"].status == RequestStatus.WAITING
        for d in b.step().deltas:
            out[d.request_id] += d.token_ids
        try:
            res = b.reserve_import("r1", imported, GREEDY)
        except NoFreeBlocks:
            pass
    assert "r0" not in b.requests  # the import got its blocks only once the long request finished
    b.kv_cache.write_blocks(list(res.block_ids), a.kv_cache.read_blocks(list(handle.block_ids)))
    assert a.release_handle("r0")
    out["r1"] += b.commit_import("r1", handle.first_token_id, handle.first_logprob).token_ids
    drain(b, out)
    assert out == colocated
    assert b.scheduler.import_waits == {}
    assert (b.stats().num_waiting_imports, b.stats().num_import_waits) == (0, 1)  # asked many times, one wait
    assert_all_blocks_free(b)

    # first come, first served: a request that arrived before the import began waiting goes first
    b.add_request("r3", long_local, GREEDY)
    b.step()
    b.add_request("r6", [40, 41, 42, 43, 44], GREEDY)
    with pytest.raises(NoFreeBlocks):
        b.reserve_import("r4", list(range(200, 232)), GREEDY)
    b.step()
    assert b.requests["r6"].status == RequestStatus.RUNNING
    # a wait nobody renews lapses; an aborted one is gone at once
    assert b.scheduler.blocks_wanted_by_imports() == 8
    monkeypatch.setattr(scheduler_module, "IMPORT_WAIT_TTL_S", 0.0)
    assert b.scheduler.blocks_wanted_by_imports() == 0 and b.scheduler.import_waits == {}
    monkeypatch.undo()
    with pytest.raises(NoFreeBlocks):
        b.reserve_import("r4", list(range(200, 232)), GREEDY)
    assert b.abort("r4") is False and b.scheduler.import_waits == {}  # unknown request, wait withdrawn
    b.add_request("r5", short_local, GREEDY)
    b.step()
    assert b.requests["r5"].status == RequestStatus.RUNNING
    drain(b, {})
    assert_all_blocks_free(b)
