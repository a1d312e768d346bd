"""The batched device sampler reproduces the per-request reference sampler token for token (seeded
and greedy rows; unseeded rows are random by contract), with logprobs, in any batch mix, penalised
rows (counted on the device over several steps) beside unpenalised ones."""

import torch

from tests.workers.engine.sampler_reference import check_same, penalize
from workers.engine.sampler import Sampler
from workers.protocol import SamplingParams


def test_batched_sampler_matches_reference():
    assert check_same(torch.device("cpu"), vocab=257, trials=150) > 500


def test_batched_sampler_matches_reference_large_vocab():
    assert check_same(torch.device("cpu"), vocab=32000, trials=12, seed=1) > 30


def test_unseeded_rows_are_random_but_follow_the_support():
    sampler = Sampler(torch.device("cpu"))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    params = [SamplingParams(top_k=2), SamplingParams(temperature=0), SamplingParams(top_p=0.7, seed=3)]
    seen = set()
    for _ in range(100):
        ids = sampler(logits, params, [0, 0, 0]).token_ids
        assert ids[1] == 0 and ids[0] in (0, 1) and ids[2] in (0, 1)
        seen.add(ids[0])
    assert seen == {0, 1}


def test_reference_penalties_are_transformers_and_openai():
    """The reference's penalties: transformers' RepetitionPenaltyLogitsProcessor over prompt and
    output, exactly; OpenAI's formula over the output tokens only."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 3
    prompt, out = [1, 2, 2, 7], [7, 9, 9, 9, 3]
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + out]), logits[None].clone())[0]
    assert torch.equal(penalize(logits, SamplingParams(repetition_penalty=1.7), prompt, out), want)
    got = penalize(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=-1.0), prompt, out)
    want = logits.clone()
    for t, count in ((7, 1), (9, 3), (3, 1)):
        want[t] -= 0.5 * count - 1.0
    assert torch.allclose(got, want) and torch.equal(got[[1, 2]], logits[[1, 2]])  # prompt only: untouched


def test_reference_min_p_is_transformers():
    """The reference's min_p keeps what transformers' MinPLogitsWarper keeps, and the batched
    sampler only ever draws from that set."""
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)) * 2
    want = MinPLogitsWarper(0.2)(None, logits.clone()) > float("-inf")
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(probs >= 0.2 * probs.max(dim=-1, keepdim=True).values, want)
    sampler = Sampler(torch.device("cpu"))
    params = [SamplingParams(min_p=0.2), SamplingParams(min_p=0.2, seed=5)]
    for _ in range(50):
        ids = sampler(logits, params, [0, 0]).token_ids
        assert want[0, ids[0]] and want[1, ids[1]]


def test_precomputed_argmax_is_taken_only_for_unchanged_logits():
    """``argmax`` (what a decode graph computed with its logits) gives the greedy rows' tokens when
    nothing changes the logits, sampled rows still sample; a ban (min_tokens) or an allowed mask
    makes the sampler take the argmax of the changed logits itself. A marker argmax (not the
    logits' own) shows which one was used."""
    sampler = Sampler(torch.device("cpu"))
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    marker = torch.tensor([2, 2, 2])
    greedy = [SamplingParams(temperature=0)] * 3
    assert sampler.sample(logits, greedy, [0, 0, 0], argmax=marker).result().token_ids == [2, 2, 2]
    assert sampler.sample(logits, greedy, [0, 0, 0]).result().token_ids == [1, 0, 3]
    mixed = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.1, seed=1),
             SamplingParams(temperature=0)]
    assert sampler.sample(logits, mixed, [0, 0, 0], argmax=marker).result().token_ids == [2, 0, 2]
    banned = sampler.sample(logits, greedy, [0, 0, 0], banned=[(0, 1)], argmax=marker).result().token_ids
    assert banned == [2, 0, 3]  # row 0 without token 1: token 2 of the logits; the others their own max
    mask = torch.tensor([[0b0011]] * 3, dtype=torch.int32)  # tokens 0 and 1 only
    allowed = sampler.sample(logits, greedy, [0, 0, 0], allowed=([0, 1, 2], mask), argmax=marker).result()
    assert allowed.token_ids == [1, 0, 0]
