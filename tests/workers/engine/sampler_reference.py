"""The engine's sampler as it was before sampling was batched on the device: one request at a
time, kept as the reference the batched sampler must reproduce token for token (tests and
benchmarks/gpu_check.py). Greedy, temperature, top-k, min-p, top-p, per-request seeds, logprobs, and the
penalties by their definitions (``penalize``): transformers' RepetitionPenaltyLogitsProcessor over
the prompt and output tokens, OpenAI's frequency/presence formula over the output tokens, computed
from the request's token lists (the batched sampler keeps counts on the device instead).

Seeded requests draw their randomness from (seed, output position), so the same seed gives the
same tokens whether the first token was sampled by a prefill worker and the rest by a decode
worker, or all by one engine.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from workers.protocol import SamplingParams


@dataclass
class ReferenceResult:
    token_ids: list[int]
    logprobs: list[float] | None  # of the chosen tokens (None if no request asked)
    top_logprobs: list[list[tuple[int, float]]] | None


class ReferenceSampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._unseeded = torch.Generator(device=device)
        self._unseeded.seed()

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                 histories: list[tuple[list[int], list[int]]] | None = None) -> ReferenceResult:
        """logits [n, vocab]; positions[i] = index of the token being sampled in request i's output;
        histories[i] = (request i's prompt tokens, its output tokens so far), for its penalties."""
        logits = raw = logits.float()
        n = logits.shape[0]
        if histories is not None:
            logits = torch.stack([penalize(logits[i], p, *histories[i]) if p.has_penalties else logits[i]
                                  for i, p in enumerate(params)])
        greedy = [p.is_greedy for p in params]
        if all(greedy):  # the common case: one argmax on the device, no index upload
            chosen = logits.argmax(dim=-1)
        else:
            chosen = torch.empty(n, dtype=torch.long, device=logits.device)
        if any(greedy) and not all(greedy):
            idx = torch.tensor([i for i, g in enumerate(greedy) if g], device=logits.device)
            chosen[idx] = logits[idx].argmax(dim=-1)
        for i, p in enumerate(params):
            if not greedy[i]:
                chosen[i] = self._sample_one(logits[i], p, positions[i])
        want_lp = any(p.logprobs or p.top_logprobs for p in params)
        token_ids = chosen.tolist()  # the step's one device->host sync for tokens
        if not want_lp:
            return ReferenceResult(token_ids, None, None)
        logprobs = torch.log_softmax(raw, dim=-1)  # the model's, before penalties
        chosen_lp = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
        k = max(p.top_logprobs for p in params)
        tops = None
        if k:
            vals, ids = logprobs.topk(k, dim=-1)
            vals, ids = vals.tolist(), ids.tolist()
            tops = [list(zip(ids[i][: p.top_logprobs], vals[i][: p.top_logprobs])) for i, p in enumerate(params)]
        return ReferenceResult(token_ids, chosen_lp, tops)

    def _sample_one(self, logits: torch.Tensor, p: SamplingParams, position: int) -> torch.Tensor:
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:  # transformers' MinPLogitsWarper's rule, on the probabilities
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            probs = probs / probs.sum()
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cum = sorted_probs.cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (always the first token)
            drop = (cum - sorted_probs) >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            probs = probs / probs.sum()
        if p.seed is not None:
            gen = torch.Generator(device=logits.device)
            gen.manual_seed((p.seed * 1_000_003 + p.output_position_offset + position) % (2**63))
        else:
            gen = self._unseeded
        # Gumbel-max via exponential noise: argmax(p / E), E ~ Exp(1), same law as multinomial
        noise = torch.empty_like(probs).exponential_(generator=gen)
        return (probs / noise).argmax()


def penalize(logits: torch.Tensor, p: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """One request's penalties on its logits [vocab], by definition: logit_bias first (vLLM's order)."""
    if p.logit_bias:
        logits = logits.clone()
        for t, b in p.logit_bias:
            logits[t] += b
    if p.repetition_penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor, one row
        ids = torch.tensor(prompt_ids + output_ids, dtype=torch.long, device=logits.device)
        score = logits.gather(0, ids)
        score = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        logits = logits.scatter(0, ids, score)
    if p.frequency_penalty != 0 or p.presence_penalty != 0:  # OpenAI's formula
        counts = torch.zeros_like(logits)
        for t in output_ids:
            counts[t] += 1
        logits = logits - (p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float())
    return logits


def output_tokens(req) -> list[int]:
    """A request's output tokens for the penalties: a migrated one's prompt tail, then its outputs."""
    prompt, k = req.prompt_token_ids, req.sampling.output_position_offset
    return prompt[max(len(prompt) - k, 0):] + req.output_token_ids


def random_penalties(rng: random.Random, vocab: int | None = None) -> dict:
    kind = rng.choice(["none", "none", "repetition", "openai", "all"])
    out = {}
    if vocab is not None and rng.random() < 0.4:  # logit_bias, alone or with the others
        tokens = rng.sample(range(vocab), rng.choice([1, 3]))
        out["logit_bias"] = tuple((t, rng.choice([-100.0, -5.0, 3.5, 100.0])) for t in tokens)
    if kind in ("repetition", "all"):
        out["repetition_penalty"] = rng.choice([0.5, 1.3, 2.0])
    if kind in ("openai", "all"):
        out["frequency_penalty"] = rng.choice([-1.0, 0.0, 0.7, 2.0])
        out["presence_penalty"] = rng.choice([-0.5, 0.0, 1.5])
    return out


def random_params(rng: random.Random, seeded_only: bool = True) -> SamplingParams:
    kind = rng.choice(["greedy", "temp", "top_k", "top_p", "both", "top_k1", "min_p", "min_p_top_p"])
    seed = rng.randrange(10**6) if (seeded_only or rng.random() < 0.5) else None
    lp = rng.random() < 0.3
    return SamplingParams(
        temperature=0.0 if kind == "greedy" else rng.choice([0.3, 0.7, 1.0, 1.5, 2.0]),
        top_k={"top_k": rng.choice([2, 5, 50]), "both": 7, "top_k1": 1}.get(kind, 0),
        top_p={"top_p": rng.choice([0.5, 0.9, 0.99]), "both": 0.8, "min_p_top_p": 0.9}.get(kind, 1.0),
        min_p={"min_p": rng.choice([0.05, 0.3, 1.0]), "min_p_top_p": 0.1}.get(kind, 0.0),
        seed=seed, logprobs=lp, top_logprobs=rng.choice([0, 3]) if lp else 0,
        output_position_offset=rng.choice([0, 0, 5]),
    )


def check_same(device: torch.device, vocab: int, trials: int, seed: int = 0) -> int:
    """Returns how many rows were compared; raises AssertionError on the first difference.

    Every other trial mixes penalised and unpenalised rows and runs 1-3 steps on the same
    requests (each with a prompt, some with earlier outputs, some migrated): the batched sampler's
    on-device token counts, filled once and counted forward from its own chosen tokens, against
    the reference's penalties from the requests' token lists."""
    rng = random.Random(seed)
    from workers.engine.penalties import TokenCounts
    from workers.engine.request import Request, RequestStatus
    from workers.engine.sampler import Sampler

    new, ref = Sampler(device), ReferenceSampler(device)
    counts = TokenCounts(vocab, device, num_slots=2)  # small: slots are reclaimed and the tables grow
    compared = 0
    for trial in range(trials):
        n = rng.choice([1, 2, 5, 8])
        penalised = trial % 2 == 1
        params = [random_params(rng) for _ in range(n)]
        if penalised:
            params = [dataclasses.replace(p, **random_penalties(rng, vocab)) for p in params]
        reqs = []
        for i, p in enumerate(params):
            req = Request(f"t{trial}-{i}", [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))], p, 16)
            for _ in range(rng.choice([0, 0, 3, 10])):
                req.append_output(rng.randrange(vocab))
            reqs.append(req)
        positions = [rng.randrange(40) for _ in range(n)]
        g = torch.Generator().manual_seed(trial)
        logits = (torch.randn(n, vocab, generator=g) * rng.choice([1.0, 4.0])).to(device)
        if trial % 3 == 0:  # ties: repeated values, and equal maxima
            logits[:, : vocab // 4] = logits[:, :1]
        for step in range(rng.choice([2, 3, 4]) if penalised else 1):
            if step:  # nearly the same logits again: only the penalties keep a row off its last token
                logits = logits + 0.01 * torch.randn(n, vocab, generator=g).to(device)
            histories = [(r.prompt_token_ids, output_tokens(r)) for r in reqs] if penalised else None
            got = new(logits, params, positions, counts.rows(reqs) if penalised else None)
            want = ref(logits, params, positions, histories)
            assert got.token_ids == want.token_ids, (trial, step, params, got.token_ids, want.token_ids)
            assert got.logprobs == want.logprobs, trial
            assert got.top_logprobs == want.top_logprobs, trial
            compared += n
            for r, t in zip(reqs, got.token_ids):
                r.append_output(t)
            positions = [q + 1 for q in positions]
        for r in reqs:
            r.status = RequestStatus.FINISHED
    return compared
