"""Several sub-requests of one OpenAI request (``n`` > 1 choices), run side by side.

    run_all(coroutines)   every one to completion, or the first failure raised and the rest cancelled
    merge(generators)     one async stream of (index, item) from several async generators, in the
                          order items arrive; closing it cancels and closes every generator

With one coroutine or generator neither makes a task: ``n = 1`` costs what it did before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from typing import TypeVar

T = TypeVar("T")


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
