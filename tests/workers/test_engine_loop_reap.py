"""A KV quota shrink that had to wait for blocks in use finishes while the engine idles: the last
step frees the blocks after that step's own reap, and no step follows, so EngineLoop returns the
retiring segments itself (before, they stayed until the next request: a live cluster's shrink
never finished on an idle worker). A real engine on the tiny llama."""

import asyncio
import time

from workers.engine_loop import EngineLoop
from workers.protocol import SamplingParams

LONG = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


async def test_an_idle_engine_returns_the_segments_a_shrink_left_pending(engine):
    engine.add_request("a", list(range(10, 70)), LONG)  # 60 prompt tokens: 15+ blocks of 4
    for _ in range(3):
        engine.step()
    res = engine.resize(16)  # one segment: the request's blocks keep the others pending
    assert res.num_pending_blocks > 0 and engine.kv_cache.num_blocks > 16
    loop = EngineLoop(engine)
    q = loop.open_stream("a")
    loop.start()
    try:
        while not (await asyncio.wait_for(q.get(), 30)).finished:
            pass
        deadline = time.monotonic() + 10
        while loop.latest().stats.num_total_blocks != 16:
            assert time.monotonic() < deadline, "the pending segments were not returned while idle"
            await asyncio.sleep(0.05)
        assert engine.kv_cache.num_blocks == 16 and not engine.has_work()
        assert engine.stats().num_used_blocks == 0
    finally:
        loop.stop()
