"""WorkerProbe: one look at a live worker, as the management API and the control loops need it.

    probe_worker(worker_id, actor) -> WorkerProbe
        engine stats      worker.stats(from_snapshot=True)
                                                KV blocks (quota, target, used, pinned), queues, bytes
        load, counters    worker.state(...)     is_draining, engine stall, preemptions, finished requests
        in flight         worker.num_inflight()
        process, node     process_info()        run inside the worker's process via Ray's
                                                __ray_call__: pid, RSS, node memory (and device
                                                memory on CUDA), the node it runs on

Every call has a deadline; a worker that does not answer gives a probe with ``error`` set and the
rest None (the caller shows it, never guesses). None of them waits for an engine step (the stats are
what the engine thread last published); a worker whose engine made no progress for longer than the
deadline gives a probe with ``error`` set too, but with what it reported (its engine_stalled_s):
the control loops leave it alone (a KV resize would wait behind its stuck step), the listing shows it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from workers.protocol import WorkerCounters, WorkerLoad

# state(since_seq) with a seq no worker reaches: the load and counters without any KV event
_NO_EVENTS_SEQ = 2**62


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    rss_bytes: int
    node_id: str  # Ray node id: workers with the same node_id share the node's memory
    node_ip: str
    node_memory_total_bytes: int
    node_memory_available_bytes: int
    node_memory_percent: float  # psutil.virtual_memory().percent on that node
    device: str  # where the KV cache lives: "cpu" | "cuda"
    device_memory_total_bytes: int | None = None  # CUDA only
    device_memory_free_bytes: int | None = None
    engine: dict | None = None  # the EngineConfig its engine runs with (cluster engine.* + its pool's)


@dataclass(frozen=True)
class WorkerProbe:
    worker_id: str
    at: float  # unix time
    stats: object | None = None  # workers.engine.engine.EngineStats
    load: WorkerLoad | None = None
    counters: WorkerCounters | None = None
    num_inflight: int | None = None
    process: ProcessInfo | None = None
    error: str | None = None  # set: not usable by the control loops (stats etc. may still be set)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def answered(self) -> bool:
        """It reported its state (maybe with ``error``: an engine making no progress)."""
        return self.stats is not None

    @property
    def block_bytes(self) -> int | None:
        """Bytes one KV block takes over all layers (K and V)."""
        s = self.stats
        if s is None or s.num_total_blocks == 0:
            return None
        return s.kv_bytes // s.num_total_blocks


def process_info(worker=None) -> ProcessInfo:
    """Runs in the worker's process (``actor.__ray_call__.remote(process_info)``)."""
    import os

    import psutil
    import ray

    vm = psutil.virtual_memory()
    device, total, free = "cpu", None, None
    engine = getattr(worker, "engine", None)
    if engine is not None and engine.kv_cache.device.type == "cuda":
        import torch

        device = "cuda"
        free, total = torch.cuda.mem_get_info(engine.kv_cache.device)
    ctx = ray.get_runtime_context()
    return ProcessInfo(
        pid=os.getpid(), rss_bytes=psutil.Process().memory_info().rss, node_id=ctx.get_node_id(),
        node_ip=ray.util.get_node_ip_address(), node_memory_total_bytes=vm.total,
        node_memory_available_bytes=vm.available, node_memory_percent=vm.percent, device=device,
        device_memory_total_bytes=total, device_memory_free_bytes=free,
        engine=engine.config.model_dump(mode="json") if engine is not None else None,
    )


async def probe_worker(worker_id: str, actor, timeout_s: float = 5.0) -> WorkerProbe:
    now = time.time()
    try:
        stats, state, num_inflight, process = await asyncio.wait_for(asyncio.gather(
            actor.stats.remote(from_snapshot=True), actor.state.remote(_NO_EVENTS_SEQ), actor.num_inflight.remote(),
            actor.__ray_call__.remote(process_info),
        ), timeout_s)
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        return WorkerProbe(worker_id, now, error=f"no answer within {timeout_s:g} s")
    except Exception as e:
        return WorkerProbe(worker_id, now, error=f"{type(e).__name__}: {_first_line(e)}")
    stalled_s = state.load.engine_stalled_s
    error = f"its engine made no progress for {stalled_s:.0f} s" if stalled_s > timeout_s else None
    return WorkerProbe(worker_id, now, stats=stats, load=state.load, counters=state.counters,
                       num_inflight=num_inflight, process=process, error=error)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:300] if text else ""
