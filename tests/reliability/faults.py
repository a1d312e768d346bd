"""Fault injection into live worker actors and the checks the reliability tests share.

The injections run inside the worker process through Ray's ``__ray_call__`` (functions pickled by
value, so workers never import the tests package). They only wrap real methods of the real
objects (the engine's step, the transceiver's read) with a delay, to hold a request at a known
point while the test kills or freezes a process; nothing is mocked.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import httpx
import ray
from ray import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def on_worker(actor, fn, *args, timeout_s: float = 60):
    """fn(worker_instance, *args), run inside the worker actor."""
    return ray.get(actor.__ray_call__.remote(fn, *args), timeout=timeout_s)


def _slow_steps(worker, delay_s: float) -> None:
    engine = worker.engine
    engine.__dict__.pop("step", None)
    if delay_s > 0:
        original = engine.step

        def step():
            time.sleep(delay_s)
            return original()

        engine.step = step  # the engine thread calls self.engine.step() each iteration


def slow_engine_steps(actor, delay_s: float) -> None:
    """Every engine step of that worker takes delay_s longer (0 restores it)."""
    on_worker(actor, _slow_steps, delay_s)


def _hold_steps(worker, hold: bool) -> None:
    import threading

    engine = worker.engine
    engine.__dict__.pop("step", None)
    gate = getattr(worker, "step_gate", None)
    if gate is not None:
        gate.set()  # a step waiting now goes on
    if hold:
        worker.step_gate = gate = threading.Event()
        original = engine.step

        def step():
            gate.wait(60)  # bounded: a test that fails to release never wedges the worker for good
            return original()

        engine.step = step


def hold_engine_steps(actor, hold: bool = True) -> None:
    """The worker's engine stops inside its next step (the actor itself goes on answering) until
    called again with hold=False (at most 60 s)."""
    on_worker(actor, _hold_steps, hold)


def _hold_reads(worker, hold_s: float) -> None:
    import asyncio

    tr = worker.transceiver
    tr.__dict__.pop("read", None)
    worker.num_held_reads = 0
    if hold_s > 0:
        original = tr.read

        async def read(*args, **kwargs):
            worker.num_held_reads += 1
            await asyncio.sleep(hold_s)
            return await original(*args, **kwargs)

        tr.read = read  # the decode worker calls self.transceiver.read(...) for each KV READ


def hold_kv_reads(actor, hold_s: float) -> None:
    """The decode worker waits hold_s before each KV READ (after the prefill handle arrived and its
    blocks were reserved): the window in which a test kills the prefill worker (0 restores it)."""
    on_worker(actor, _hold_reads, hold_s)


def num_held_reads(actor) -> int:
    return on_worker(actor, lambda w: getattr(w, "num_held_reads", 0))


def inflight(actor, timeout_s: float = 30) -> list[str]:
    return on_worker(actor, lambda w: sorted(w.inflight), timeout_s=timeout_s)


def pinned_leases(actor) -> int:
    return on_worker(actor, lambda w: w.leases.num_leases)


def counters(actor) -> dict:
    """The worker's WorkerCounters fields, transfer totals current (not as of the last poll)."""
    return on_worker(actor, lambda w: {**w.counters, **w.transceiver.counters()})


def pid_of(actor) -> int:
    return on_worker(actor, lambda w: os.getpid())


def freeze(pid: int) -> None:
    """SIGSTOP: the process hangs (no tokens, no polls, no etcd keepalive) but Ray still sees it alive."""
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def actor_of(cluster, worker_id: str):
    return ray.get(cluster.manager.actor_of.remote(worker_id), timeout=60)


def routing(url: str) -> dict:
    return httpx.get(url + "/v1/routing/recent", timeout=30).json()


def workers_of(url: str, role: str | None = None) -> dict:
    return {wid: w for wid, w in routing(url)["workers"].items() if role is None or w["role"] == role}


def metric(url: str, name: str) -> float:
    """Sum of a Prometheus metric's samples (all label sets) on the endpoint's /metrics."""
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_samples(url: str, name: str, label: str) -> dict[str, float]:
    """A Prometheus metric's samples on the endpoint's /metrics, summed by one label's value."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + "{"):
            value = re.search(label + r'="([^"]*)"', line)
            if value:
                out[value.group(1)] = out.get(value.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    """Polls predicate() until truthy (returned); a liveness bound, not a speed check."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def assert_no_leaks(url: str, timeout_s: float = 30) -> None:
    """No worker holds KV blocks, and the router counts no prefill in flight on any worker."""
    last = {}

    def clean():
        nonlocal last
        last = {wid: (w["used_blocks"], w["pinned_blocks"], w["prefills_in_flight"])
                for wid, w in workers_of(url).items()}
        return last and all(v == (0, 0, 0) for v in last.values())

    try:
        wait_for(clean, timeout_s, "every worker to hold 0 KV blocks")
    except AssertionError:
        raise AssertionError(f"still in use per worker (KV blocks used, pinned; router-counted prefills in "
                             f"flight): {last}") from None
