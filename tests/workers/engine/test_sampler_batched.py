"""The batched device sampler reproduces the per-request reference sampler token for token (seeded
and greedy rows; unseeded rows are random by contract), with logprobs, in any batch mix."""

import random

import torch

from tests.workers.engine.sampler_reference import ReferenceSampler
from workers.engine.sampler import Sampler
from workers.protocol import SamplingParams


def random_params(rng: random.Random, seeded_only: bool = True) -> SamplingParams:
    kind = rng.choice(["greedy", "temp", "top_k", "top_p", "both", "top_k1"])
    seed = rng.randrange(10**6) if (seeded_only or rng.random() < 0.5) else None
    lp = rng.random() < 0.3
    return SamplingParams(
        temperature=0.0 if kind == "greedy" else rng.choice([0.3, 0.7, 1.0, 1.5, 2.0]),
        top_k={"top_k": rng.choice([2, 5, 50]), "both": 7, "top_k1": 1}.get(kind, 0),
        top_p={"top_p": rng.choice([0.5, 0.9, 0.99]), "both": 0.8}.get(kind, 1.0),
        seed=seed, logprobs=lp, top_logprobs=rng.choice([0, 3]) if lp else 0,
        output_position_offset=rng.choice([0, 0, 5]),
    )


def check_same(device: torch.device, vocab: int, trials: int, seed: int = 0) -> int:
    """Returns how many rows were compared; raises AssertionError on the first difference."""
    rng = random.Random(seed)
    new, ref = Sampler(device), ReferenceSampler(device)
    compared = 0
    for trial in range(trials):
        n = rng.choice([1, 2, 5, 8])
        params = [random_params(rng) for _ in range(n)]
        positions = [rng.randrange(40) for _ in range(n)]
        g = torch.Generator().manual_seed(trial)
        logits = (torch.randn(n, vocab, generator=g) * rng.choice([1.0, 4.0])).to(device)
        if trial % 3 == 0:  # ties: repeated values, and equal maxima
            logits[:, : vocab // 4] = logits[:, :1]
        got, want = new(logits, params, positions), ref(logits, params, positions)
        assert got.token_ids == want.token_ids, (trial, params, got.token_ids, want.token_ids)
        assert got.logprobs == want.logprobs, trial
        assert got.top_logprobs == want.top_logprobs, trial
        compared += n
    return compared


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
