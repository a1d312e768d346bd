"""The serving benchmark's workloads: seeded lists of requests with open-loop arrival times.

Every request is fixed before the run starts (token-id prompts, a fixed output length with EOS
ignored, a Poisson arrival time), so a run never depends on what the model answers and the same
seed gives the same requests for every configuration compared.

    prefill_heavy   long prompts, short outputs (DistServe's summarisation-like mix)
    decode_heavy    short prompts, long outputs
    multi_turn      chat conversations under one shared system prompt; turn k's prompt is turn
                    k-1's prompt + a (synthetic) assistant reply + a new user message, so each
                    turn's prompt starts with the previous turn's whole prompt; ``context_tokens``
                    gives every conversation its own long context first (a document, a codebase
                    excerpt: chat over a long input), which a turn routed away from it re-prefills:

        turn k: [system | context | u0 a0 | u1 a1 | ... | u(k-1) a(k-1) | uk]   (max_tokens = len(a))

The assistant replies are synthetic (drawn with the seed, of the requested output length), not the
model's outputs: the cache hit a turn can get is its previous turn's prompt, which is what routing
decides. Arrivals go turn-major (every conversation's turn 0, then every turn 1, ...), each round
in a new seeded order: consecutive turns of one conversation are about ``num_conversations``
arrivals apart, and a round-robin router cannot keep a conversation on one worker by accident
(with a fixed order and an even number of conversations, every turn would land on the worker
of the first).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORKLOADS = ("prefill_heavy", "decode_heavy", "multi_turn")


@dataclass(frozen=True)
class WorkloadShape:
    """Sizes of one workload (tokens). Prompt and output lengths vary +-``jitter`` (a fraction)."""

    prompt_tokens: int
    output_tokens: int
    jitter: float = 0.25
    # multi_turn only
    system_tokens: int = 0
    context_tokens: int = 0  # per conversation, after the system prompt (+-jitter)
    user_tokens: int = 0
    num_turns: int = 1


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival_s: float  # seconds after the run starts
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    conversation: int | None = None
    turn: int = 0


def poisson_arrivals(num_requests: int, rate_rps: float, rng: random.Random) -> list[float]:
    """Open-loop arrival times: exponential gaps with mean 1/rate (the first request at t=0)."""
    if rate_rps <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate_rps}")
    times, t = [], 0.0
    for _ in range(num_requests):
        times.append(t)
        t += rng.expovariate(rate_rps)
    return times


def _length(mean: int, jitter: float, rng: random.Random) -> int:
    low, high = max(1, round(mean * (1 - jitter))), max(1, round(mean * (1 + jitter)))
    return rng.randint(low, high)


def _tokens(n: int, rng: random.Random, token_range: tuple[int, int]) -> list[int]:
    return [rng.randrange(*token_range) for _ in range(n)]


def build_workload(name: str, shape: WorkloadShape, num_requests: int, rate_rps: float, seed: int,
                   token_range: tuple[int, int]) -> list[BenchRequest]:
    """The requests of one run. ``token_range``: [low, high) of the prompt token ids (within the
    model's vocabulary). Prompts and arrivals come from separate seeded streams, so the same
    workload at another rate has the same prompts."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; workloads are {WORKLOADS}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    content = random.Random(f"{seed}-{name}-content")
    arrivals = poisson_arrivals(num_requests, rate_rps, random.Random(f"{seed}-{name}-{rate_rps}-arrivals"))
    if name != "multi_turn":
        return [BenchRequest(i, arrivals[i], tuple(_tokens(_length(shape.prompt_tokens, shape.jitter, content),
                                                            content, token_range)),
                             _length(shape.output_tokens, shape.jitter, content))
                for i in range(num_requests)]
    return _multi_turn(shape, arrivals, content, token_range)


def _multi_turn(shape: WorkloadShape, arrivals: list[float], rng: random.Random,
                token_range: tuple[int, int]) -> list[BenchRequest]:
    if shape.num_turns < 1 or shape.user_tokens < 1:
        raise ValueError("multi_turn needs num_turns >= 1 and user_tokens >= 1")
    num_requests = len(arrivals)
    num_conversations = -(-num_requests // shape.num_turns)
    system = _tokens(shape.system_tokens, rng, token_range)
    history = [system + (_tokens(_length(shape.context_tokens, shape.jitter, rng), rng, token_range)
                         if shape.context_tokens else []) for _ in range(num_conversations)]
    out: list[BenchRequest] = []
    for turn in range(shape.num_turns):
        order = list(range(num_conversations))
        rng.shuffle(order)
        for conv in order:
            if len(out) == num_requests:
                return out
            history[conv] += _tokens(_length(shape.user_tokens, shape.jitter, rng), rng, token_range)
            reply = _length(shape.output_tokens, shape.jitter, rng)
            i = len(out)
            out.append(BenchRequest(i, arrivals[i], tuple(history[conv]), reply, conv, turn))
            history[conv] += _tokens(reply, rng, token_range)
    return out
