"""workers/compile_watch.py: compiles inside a worker are timed into its HopTimer."""

import torch

from workers import compile_watch
from workers.worker_base import HopTimer


def test_dynamo_and_triton_compiles_are_timed():
    earlier, hops = HopTimer(), HopTimer()
    assert compile_watch.install(earlier)
    assert compile_watch.install(hops)  # hooked once; the latest install's timer gets the times

    @torch.compile(backend="eager", dynamic=False)
    def f(x):
        return torch.sin(x) * 2

    f(torch.ones(3))
    timed = hops.snapshot(clear=True)
    assert len(timed.get("jit.dynamo", ())) >= 1 and all(t >= 0 for t in timed["jit.dynamo"]), timed
    f(torch.ones(3))  # cached: no new compile
    assert "jit.dynamo" not in hops.snapshot(clear=True)

    # Triton calls its knobs' hooks around each specialisation's compile; on this GPU-less box the
    # hooks are called as Triton calls them (keyword arguments, the same key before and after)
    from triton import knobs

    assert knobs.runtime.jit_cache_hook(key=("k", 1), fn=None) is None  # None: go on and compile
    knobs.runtime.jit_post_compile_hook(key=("k", 1), fn=None)
    knobs.runtime.jit_post_compile_hook(key=("other", 2), fn=None)  # no start seen: not timed
    assert len(hops.snapshot()["jit.triton"]) == 1
    assert not earlier.snapshot()


def test_compiles_after_the_worker_started_serving_are_counted_apart():
    hops = HopTimer()
    compile_watch.install(hops)
    before = compile_watch.serving_compiles()
    compile_watch.mark_serving()

    @torch.compile(backend="eager", dynamic=False)
    def g(x):
        return torch.cos(x) + 1

    g(torch.ones(2))
    count, seconds = compile_watch.serving_compiles()
    assert count >= before[0] + 1 and seconds >= before[1]

