"""What EngineLoop publishes for readers that must not wait for a step (the router's poll): the
engine's stats, as of its last batch of commands or step, and a heartbeat that stays fresh while
the engine idles and grows while it is stuck in one step. A dead engine answers nothing.
A real engine on a tiny model; its step is held on an Event (the real step runs once released)."""

import asyncio
import threading

import pytest

from workers.engine_loop import EngineDeadError, EngineLoop
from workers.protocol import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def hold_steps(engine) -> threading.Event:
    """Each step waits for the returned Event (at most 30 s), then runs."""
    gate, original = threading.Event(), engine.step

    def step():
        gate.wait(30)
        return original()

    engine.step = step
    return gate


async def finished(q: asyncio.Queue) -> None:
    while not (await q.get()).finished:
        pass


async def test_polls_read_the_snapshot_while_a_step_is_stuck_and_the_heartbeat_says_so(engine):
    loop = EngineLoop(engine)
    loop.start()
    gate = hold_steps(engine)
    try:
        assert not loop.latest().has_work and loop.latest().stats.num_running == 0
        await asyncio.sleep(0.3)
        assert loop.stalled_s() < 0.2  # idle: the loop wakes every 50 ms
        q = loop.open_stream("a")
        await loop.call(lambda e: e.add_request("a", list(range(10, 40)), GREEDY))
        # the call returned: its effect is published, though the engine is now held in a step
        snap = loop.latest()
        assert snap.has_work and snap.stats.num_waiting + snap.stats.num_running == 1
        assert snap.stats.num_pending_prefill_tokens == 30
        with pytest.raises(asyncio.TimeoutError):  # what a poll did before: wait for the step to end
            await asyncio.wait_for(loop.call(lambda e: e.stats()), 0.5)
        assert loop.latest() is snap and loop.stalled_s() >= 0.5
        gate.set()
        await asyncio.wait_for(finished(q), 30)
        await asyncio.sleep(0.1)
        snap = loop.latest()  # published when it ran out of work
        assert not snap.has_work and snap.stats.num_running == snap.stats.num_used_blocks == 0
        assert loop.stalled_s() < 0.2
    finally:
        gate.set()
        engine.__dict__.pop("step", None)
        loop.stop()
    with pytest.raises(EngineDeadError):
        loop.latest()


async def test_a_dead_engine_thread_answers_no_snapshot(engine):
    loop = EngineLoop(engine)
    loop.start()

    def broken_step():
        raise RuntimeError("broken step")

    engine.step = broken_step
    try:
        q = loop.open_stream("b")
        await loop.call(lambda e: e.add_request("b", list(range(50, 60)), GREEDY))
        delta = await asyncio.wait_for(q.get(), 30)  # every stream fails once the thread is gone
        assert delta.finished and "broken step" in delta.error
        with pytest.raises(EngineDeadError, match="broken step"):
            loop.latest()
    finally:
        engine.__dict__.pop("step", None)
        loop.stop()
