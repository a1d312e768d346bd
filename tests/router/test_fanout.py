"""router/fanout.py: the choices of an n > 1 request run side by side, and none outlives the
request (a failure or a closed stream cancels the others and runs their clean-up)."""

import asyncio

import pytest

from router import fanout


def test_run_all_returns_every_result_in_order():
    async def one(i, delay):
        await asyncio.sleep(delay)
        return i

    assert asyncio.run(fanout.run_all([one(0, 0.03), one(1, 0.0), one(2, 0.01)])) == [0, 1, 2]


def test_run_all_raises_the_first_failure_and_cancels_the_rest():
    cleaned = []

    async def slow(i):
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(i)

    async def fails():
        await asyncio.sleep(0.01)
        raise KeyError("boom")

    async def main():
        with pytest.raises(KeyError):
            await asyncio.wait_for(fanout.run_all([slow(0), fails(), slow(2)]), 5)

    asyncio.run(main())
    assert sorted(cleaned) == [0, 2]


async def _gen(i, items, delay, closed):
    try:
        for x in items:
            await asyncio.sleep(delay)
            yield f"{i}:{x}"
    finally:
        closed.append(i)


def test_merge_interleaves_as_items_arrive_and_ends_with_the_last_generator():
    closed = []

    async def main():
        gens = [_gen(0, range(3), 0.02, closed), _gen(1, range(5), 0.005, closed)]
        return [pair async for pair in fanout.merge(gens)]

    got = asyncio.run(main())
    assert sorted(got) == sorted([(0, f"0:{x}") for x in range(3)] + [(1, f"1:{x}") for x in range(5)])
    assert [x for i, x in got if i == 0] == ["0:0", "0:1", "0:2"]  # each generator's order kept
    assert got.index((1, "1:4")) < got.index((0, "0:2"))  # the fast one finished first
    assert sorted(closed) == [0, 1]


def test_closing_the_merge_closes_every_generator():
    """A client that goes away mid-stream: every choice's clean-up runs before aclose returns."""
    closed = []

    async def main():
        merged = fanout.merge([_gen(i, range(1000), 0.01, closed) for i in range(3)])
        first = await merged.__anext__()
        await merged.aclose()
        return first

    assert asyncio.run(main())[1].endswith(":0")
    assert sorted(closed) == [0, 1, 2]


def test_an_error_in_one_generator_ends_the_merge_and_closes_the_others():
    closed = []

    async def broken():
        yield "x"
        await asyncio.sleep(0.02)
        raise ConnectionError("worker gone")

    async def main():
        seen = []
        with pytest.raises(ConnectionError):
            async for pair in fanout.merge([_gen(0, range(1000), 0.005, closed), broken()]):
                seen.append(pair)
        return seen

    seen = asyncio.run(main())
    assert (1, "x") in seen and closed == [0]


def test_one_generator_needs_no_task():
    closed = []

    async def main():
        return [p async for p in fanout.merge([_gen(0, range(3), 0, closed)])], asyncio.all_tasks()

    got, tasks = asyncio.run(main())
    assert got == [(0, "0:0"), (0, "0:1"), (0, "0:2")] and len(tasks) == 1 and closed == [0]
