"""The disaggregation split points: prefill in engine A, copy the handle's blocks into engine B
(same process), decode in B: token-identical to A alone."""

import pytest

from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, drain, make_engine, run_all
from workers.protocol import FinishReason, SamplingParams


def transfer(a, b, handle, prompt, sampling=GREEDY):
    """What a transceiver does, in-process: reserve on B, copy the blocks B lacks, commit."""
    res = b.reserve_import(handle.request_id, prompt, sampling)
    n = res.num_local_cached_blocks
    b.kv_cache.write_blocks(list(res.block_ids[n:]), a.kv_cache.read_blocks(list(handle.block_ids[n:])))
    assert a.release_handle(handle.request_id)
    return b.commit_import(handle.request_id, handle.first_token_id, handle.first_logprob)


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
    model_dir = tiny_checkpoint("llama")
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    one = SamplingParams(max_tokens=1, temperature=0)
    h = prefill(a, [PROMPTS[0]], one)["r0"]
    first = transfer(a, b, h, PROMPTS[0], one)
    assert first.finish_reason == FinishReason.LENGTH and first.token_ids == (h.first_token_id,)
    assert not b.has_work()
    assert_all_blocks_free(a)
    assert_all_blocks_free(b)


def test_seeded_sampling_same_when_split(tiny_checkpoint):
    model_dir = tiny_checkpoint("qwen2")
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    colocated = run_all(make_engine(model_dir), [PROMPTS[2]], sp)
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    h = prefill(a, [PROMPTS[2]], sp)["r0"]
    out = {"r0": list(transfer(a, b, h, PROMPTS[2], sp).token_ids)}
    drain(b, out)
    assert out == colocated
