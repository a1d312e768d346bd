"""Several sub-requests of one OpenAI request (``n`` > 1 choices), run side by side.

    choices(n, prompts)   the (prompt, SamplingParams) of every choice, checked against the
                          model's vocabulary and the concurrency limit
    run_all(coroutines)   every one to completion, or the first failure raised and the rest cancelled
    merge(generators)     one async stream of (index, item) from several async generators, in the
                          order items arrive; closing it cancels and closes every generator

With one coroutine or generator neither makes a task: ``n = 1`` costs what it did before.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from typing import TypeVar

from workers.protocol import InvalidRequestError, SamplingParams

T = TypeVar("T")
SEED_MODULUS = 1 << 63  # choice i of a seeded request samples with (seed + i) mod this


def choices(n: int, prompts: list[tuple[list[int], SamplingParams]], vocab_size: int,
            max_concurrent_requests: int) -> list[tuple[list[int], SamplingParams]]:
    """(prompt, SamplingParams) of every choice: choice p * n + i answers prompt p (OpenAI's order),
    and the checks that need this model (logit_bias ids). With a seed, choice i of each prompt
    samples with seed + i (the same request gives the same n choices, which differ from each
    other, and a prompt gives in a batch what it gives alone); greedy choices are equal. Each
    choice is a request of its own in the cluster and counts against the concurrency limit."""
    if any(t >= vocab_size for t, _ in prompts[0][1].logit_bias):
        raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab_size})", "logit_bias")
    if any(t >= vocab_size for t in prompts[0][1].allowed_token_ids):
        raise InvalidRequestError(f"allowed_token_ids must be in [0, {vocab_size})", "allowed_token_ids")
    limit, count = max_concurrent_requests, len(prompts) * n
    if count > limit:
        what = f"n={n}" if len(prompts) == 1 else f"{len(prompts)} prompts x n={n}"
        raise InvalidRequestError(f"{what} exceeds this server's limit of {limit} concurrent requests",
                                  "n" if len(prompts) == 1 else "prompt")
    return [(prompt, sampling if i == 0 or sampling.seed is None
             else dataclasses.replace(sampling, seed=(sampling.seed + i) % SEED_MODULUS))
            for prompt, sampling in prompts for i in range(n)]


async def run_all(coroutines: Sequence[Awaitable[T]]) -> list[T]:
    """Results in order. The first exception is raised as is (not as an ExceptionGroup), after the
    others were cancelled and awaited, so no sub-request outlives the call."""
    if len(coroutines) == 1:
        return [await coroutines[0]]
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        await _cancel(tasks)


async def merge(generators: Sequence[AsyncGenerator[T, None]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the generator, item) as items arrive; ends when every generator has ended. An
    exception from any generator ends the merge with it. On the way out (end, exception, or the
    consumer closing this) every pending read is cancelled and every generator closed, so their
    own clean-up (a sub-request's ``finally``) runs before this returns."""
    if len(generators) == 1:
        try:
            async for item in generators[0]:
                yield 0, item
        finally:
            await generators[0].aclose()
        return
    pending = {asyncio.ensure_future(g.__anext__()): i for i, g in enumerate(generators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):  # same-time arrivals in index order
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                yield i, item
                pending[asyncio.ensure_future(generators[i].__anext__())] = i
    finally:
        await _cancel(list(pending))
        for g in generators:  # a generator whose read was cancelled is closed already: aclose is a no-op
            await g.aclose()


async def _cancel(tasks: list[asyncio.Future]) -> None:
    for t in tasks:
        if not t.done():
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
