"""Sampling parameters end to end through the engine: seeds, top-k/top-p, stops, logprobs."""

import math

import pytest
import torch

from tests.workers.engine.helpers import PROMPTS, assert_all_blocks_free, hf_model, make_engine, run_all
from workers.engine.sampler import Sampler
from workers.protocol import FinishReason, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def engine(model_dir, scheduling):
    return make_engine(model_dir)


def test_same_seed_same_tokens_different_seed_differs(engine):
    sp = lambda seed: SamplingParams(max_tokens=16, temperature=1.5, seed=seed, ignore_eos=True)
    a = run_all(engine, PROMPTS[:2], sp(7), prefix="a")
    b = run_all(engine, PROMPTS[:2], sp(7), prefix="b")
    c = run_all(engine, PROMPTS[:2], sp(8), prefix="c")
    assert [a["a0"], a["a1"]] == [b["b0"], b["b1"]]
    assert [a["a0"], a["a1"]] != [c["c0"], c["c1"]]


def test_top_k_1_is_greedy(engine):
    greedy = run_all(engine, PROMPTS[:3], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), prefix="g")
    topk1 = run_all(engine, PROMPTS[:3], SamplingParams(max_tokens=8, temperature=2.0, top_k=1, ignore_eos=True), prefix="k")
    assert list(greedy.values()) == list(topk1.values())


def test_sampler_top_k_and_top_p_restrict_support():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen_k, seen_p = set(), set()
    for seed in range(200):
        seen_k |= set(sampler(logits, [SamplingParams(top_k=2, seed=seed)], [0]).token_ids)
        seen_p |= set(sampler(logits, [SamplingParams(top_p=0.7, seed=seed)], [0]).token_ids)
    assert seen_k == {0, 1}
    assert seen_p == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3


def test_logprobs_match_model(engine, model_dir):
    sp = SamplingParams(max_tokens=3, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)
    engine.add_request("lp", PROMPTS[0], sp)
    deltas = []
    while engine.has_work():
        deltas += [d for d in engine.step().deltas if d.request_id == "lp"]
    first = deltas[0]
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([PROMPTS[0]])).logits[0, -1]
    ref = torch.log_softmax(logits.float(), -1)
    assert math.isclose(first.logprobs[0], ref[first.token_ids[0]].item(), abs_tol=1e-4)
    top = first.top_logprobs[0]
    assert [t for t, _ in top] == ref.topk(3).indices.tolist()
    assert top[0][0] == first.token_ids[0]


def test_stop_token_and_stop_string_and_eos(engine):
    base = run_all(engine, [PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), prefix="base")["base0"]
    stop_tok = base[4]
    out = run_all(engine, [PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_tok,)), prefix="st")
    assert out["st0"] == base[: base.index(stop_tok) + 1]

    full_text = engine.tokenizer.decode(base, skip_special_tokens=True)
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 2]
    engine.add_request("ss", PROMPTS[2], SamplingParams(max_tokens=12, temperature=0, stop=(stop,), ignore_eos=True))
    text, finish = "", None
    while engine.has_work():
        for d in engine.step().deltas:
            text += d.text
            finish = d.finish_reason or finish
    assert finish == FinishReason.STOP
    assert stop not in text and full_text.startswith(text) and len(text) == full_text.index(stop)

    # EOS: make the model's own greedy token the EOS id -> stops with "stop" unless ignore_eos
    eos_engine = make_engine(engine.runner.model.name_or_path)
    eos_engine.runner.eos_token_ids = frozenset({base[0]})
    fin = drain_one(eos_engine, SamplingParams(max_tokens=12, temperature=0))
    assert fin.finish_reason == FinishReason.STOP and fin.token_ids == (base[0],)
    fin = drain_one(eos_engine, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert fin.finish_reason == FinishReason.LENGTH
    assert_all_blocks_free(eos_engine)


def drain_one(engine, sp):
    engine.add_request("one", PROMPTS[2], sp)
    done = []
    while engine.has_work():
        done += [d for d in engine.step().deltas if d.finished]
    return done[-1]


def test_streamed_text_equals_decoded_tokens(engine):
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine.add_request("txt", PROMPTS[3], sp)
    text, ids = "", []
    while engine.has_work():
        for d in engine.step().deltas:
            text += d.text
            ids += d.token_ids
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert_all_blocks_free(engine)
