"""Prompt logprobs (SamplingParams.prompt_logprobs) through the engine, in both scheduling modes
(conftest.py): each prompt token's logprob and the top k at each position equal a by-hand
transformers forward (log_softmax of the model's logits, gathered at the next prompt token; ids
equal to torch.topk's) for prompts chunked over several steps, for a prompt whose prefix is cached,
and for one preempted halfway through its prompt; requests without them in the same batches come
out token-identical to transformers' generate; no KV block is left in use."""

import dataclasses

import pytest
import torch

from tests.workers.engine.helpers import (GREEDY, PROMPTS, assert_all_blocks_free, drain, hf_greedy, hf_model,
                                          make_engine)
from tests.workers.engine.test_split import prefill, transfer
from workers.protocol import SamplingParams, TokenDelta, merge_deltas

LONG = [(i * 7) % 300 + 3 for i in range(70)]  # 70 tokens > max_num_batched_tokens (16): five chunks
ECHO = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)  # what lm-eval's loglikelihood asks
ATOL = 1e-4  # fp32, paged attention vs transformers' sdpa


def reference(model_dir: str, prompt: list[int], k: int):
    """(logprob of prompt[i] given prompt[:i] for i >= 1, top-k (values, ids) at positions [0, n-1))."""
    with torch.inference_mode():
        logprobs = hf_model(model_dir)(torch.tensor([prompt])).logits[0].float().log_softmax(-1)[:-1]
    return logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], logprobs.topk(k, dim=-1)


def check(model_dir: str, prompt: list[int], delta, k: int) -> None:
    want, (top_vals, top_ids) = reference(model_dir, prompt, k)
    got = delta.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    torch.testing.assert_close(torch.tensor(got[1:], dtype=torch.float32), want, atol=ATOL, rtol=0)
    if k == 0:
        assert delta.prompt_top_logprobs is None
        return
    tops = delta.prompt_top_logprobs
    assert len(tops) == len(prompt) and tops[0] is None and all(len(t) == k for t in tops[1:])
    assert [[i for i, _ in t] for t in tops[1:]] == top_ids.tolist()
    torch.testing.assert_close(torch.tensor([[v for _, v in t] for t in tops[1:]]), top_vals, atol=ATOL, rtol=0)


def run(engine, requests: dict, preemptions: dict | None = None) -> dict:
    """Submit (prompt, sampling) per id, step to the end; per id: (tokens, first delta). Into
    ``preemptions``: how often each request was preempted before its first delta."""
    out = {rid: ([], None) for rid in requests}
    for rid, (prompt, sp) in requests.items():
        engine.add_request(rid, prompt, sp)
    reqs = dict(engine.requests)
    while engine.has_work():
        for d in engine.step().deltas:
            assert d.error is None, d.error
            tokens, first = out[d.request_id]
            tokens += d.token_ids
            if first is None:
                out[d.request_id] = (tokens, d)
                if preemptions is not None:
                    preemptions[d.request_id] = reqs[d.request_id].num_preemptions
            else:
                assert d.prompt_logprobs is None and d.prompt_top_logprobs is None  # the first delta only
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


def test_chunked_prompts_match_the_model_and_others_are_untouched(model_dir):
    engine = make_engine(model_dir, max_num_batched_tokens=16)
    lp = dataclasses.replace(GREEDY, prompt_logprobs=3)
    requests = {"long": (LONG, ECHO), "k0": (PROMPTS[2], dataclasses.replace(ECHO, prompt_logprobs=0)),
                "gen": (PROMPTS[0], lp), "one": ([42], ECHO)}  # 1 token: no prefix, nothing to score
    requests |= {f"plain{i}": (p, GREEDY) for i, p in enumerate(PROMPTS[:4])}
    got = run(engine, requests)
    check(model_dir, LONG, got["long"][1], 5)
    check(model_dir, PROMPTS[2], got["k0"][1], 0)
    check(model_dir, PROMPTS[0], got["gen"][1], 3)
    assert got["one"][1].prompt_logprobs == (None,) and got["one"][1].prompt_top_logprobs == (None,)
    assert got["gen"][0] == hf_greedy(model_dir, PROMPTS[0], GREEDY.max_tokens)  # decoding goes on as usual
    for i, p in enumerate(PROMPTS[:4]):
        assert got[f"plain{i}"][0] == hf_greedy(model_dir, p, GREEDY.max_tokens)
        assert got[f"plain{i}"][1].prompt_logprobs is None
    assert_all_blocks_free(engine)


def test_a_cached_prefix_is_computed_again_and_published(model_dir):
    engine = make_engine(model_dir, max_num_batched_tokens=16)
    run(engine, {"warm": (LONG, GREEDY)})  # LONG's blocks are in the prefix cache now
    hit = engine.stats().prompt_tokens_hit
    got = run(engine, {"echo": (LONG, dataclasses.replace(ECHO, prompt_logprobs=1))})["echo"][1]  # (k 1: max)
    assert got.num_cached_tokens == 0 and engine.stats().prompt_tokens_hit == hit
    check(model_dir, LONG, got, 1)
    run(engine, {"again": (LONG, GREEDY)})
    assert engine.stats().prompt_tokens_hit - hit == 68  # the cache still serves others (17 full blocks)
    assert_all_blocks_free(engine)


def test_a_request_preempted_inside_its_prompt_starts_over(model_dir):
    """16 blocks of 4 tokens, 7 prompt tokens a step: the echo request (the newest) loses its blocks
    to the decoding one halfway through its prompt and recomputes it from the start."""
    engine = make_engine(model_dir, num_kv_blocks=16, blocks_per_segment=16, max_num_batched_tokens=8)
    decoding = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    preemptions = {}
    got = run(engine, {"dec": (LONG[:30], decoding), "echo": (LONG[30:62], ECHO)}, preemptions)
    assert preemptions["echo"] >= 1
    check(model_dir, LONG[30:62], got["echo"][1], 5)
    assert got["dec"][0] == hf_greedy(model_dir, LONG[:30], 12)
    assert_all_blocks_free(engine)


def test_prefilled_on_a_prefill_engine_and_handed_on_by_the_import(model_dir):
    """Prefill-only on engine A computes them and its KVHandle carries them; engine B's import
    puts them on the first delta. One token (lm-eval's loglikelihood): the handle is final, A
    already freed the blocks, B takes none (finish_import). More tokens: an import as usual."""
    a, b = make_engine(model_dir, worker_id="A"), make_engine(model_dir, worker_id="B")
    colocated = run(make_engine(model_dir), {"one": (LONG, ECHO), "more": (PROMPTS[2], dataclasses.replace(
        ECHO, max_tokens=6))})
    handles = prefill(a, [LONG], ECHO, prefix="one")
    handle = handles["one0"]
    assert handle.final and handle.block_ids == () and a.stats().num_pinned == 0 and not a.requests
    first = b.finish_import("one0", LONG, ECHO, handle)
    assert first.finished and first.token_ids == colocated["one"][1].token_ids
    check(model_dir, LONG, first, 5)
    assert b.stats().num_used_blocks == 0 and not b.requests
    more = dataclasses.replace(ECHO, max_tokens=6)
    handle = prefill(a, [PROMPTS[2]], more, prefix="more")["more0"]
    assert not handle.final and handle.block_ids and handle.prompt_logprobs is not None
    first = transfer(a, b, handle, PROMPTS[2], more)
    check(model_dir, PROMPTS[2], first, 5)
    out = {"more0": list(first.token_ids)}
    drain(b, out)
    assert out["more0"] == colocated["more"][0]
    with pytest.raises(ValueError, match="holds blocks"):
        b.finish_import("x", PROMPTS[2], more, handle)
    assert_all_blocks_free(a)
    assert_all_blocks_free(b)


def test_deltas_merged_for_one_message_keep_the_prompt_logprobs():
    """A decode worker sends a request's deltas in messages of several (stream_interval)."""
    first = TokenDelta("r", (1,), "a", prompt_logprobs=(None, -1.5), prompt_top_logprobs=(None, ((3, -0.5),)))
    merged = merge_deltas([first, TokenDelta("r", (2,), "b"), TokenDelta("r", (3,), "c")])
    assert merged.token_ids == (1, 2, 3) and merged.prompt_logprobs == first.prompt_logprobs
    assert merged.prompt_top_logprobs == first.prompt_top_logprobs
    assert merge_deltas([TokenDelta("r", (2,), "b"), TokenDelta("r", (3,), "c")]).prompt_logprobs is None
