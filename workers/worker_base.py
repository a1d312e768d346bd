"""What prefill and decode workers share: the engine on its thread, the KV transceiver, etcd
registration, the router's state poll, drain, KV resize and shutdown.

Workers are async Ray actors: methods run on the actor's event loop; engine work runs on the
engine thread (EngineLoop). Heavy set-up (loading the model) happens in ``start``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import sys
import time

from cluster.config import EtcdConfig
from kv_transfer.config import TransferConfig
from workers import compile_watch
from workers.engine.config import EngineConfig, ModelConfig
from workers.engine_loop import EngineLoop
from workers.gpu_visibility import show_node_gpus_assigned_first
from workers.model_files import resolve_model_path
from workers.protocol import (Role, WorkerCounters, WorkerDrainingError, WorkerInfo, WorkerLoad,
                              WorkerState)

log = logging.getLogger(__name__)

# A worker has two busy Python threads: the engine thread (steps back to back while requests run)
# and the actor's event loop (Ray calls, streaming deltas). A thread that wakes up wanting the GIL
# waits up to the switch interval (CPython default 5 ms) for the running one to drop it, and every
# hand-off between the two (a command's result, a step's deltas) crosses it: 5 ms is the whole
# decode step of a small model. 0.5 ms bounds that wait at a cost of more frequent switches.
GIL_SWITCH_INTERVAL_S = 0.0005


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, each component's own config section."""

    worker_id: str
    role: Role
    cluster_name: str
    model: ModelConfig
    engine: EngineConfig
    transfer: TransferConfig
    etcd: EtcdConfig
    local_prefill_threshold_tokens: int = 32
    max_prefill_attempts: int = 2


class HopTimer:
    """Recent durations of named steps of a request's path (the latency floor's parts): the last
    ``window`` of each, in seconds. Diagnostic only: nothing routes or decides on them."""

    def __init__(self, window: int = 1000):
        self._times: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=window))

    def add(self, name: str, seconds: float) -> None:
        self._times[name].append(seconds)

    @contextlib.contextmanager
    def time(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._times[name].append(time.perf_counter() - t0)

    def snapshot(self, clear: bool = False) -> dict[str, tuple[float, ...]]:
        out = {name: tuple(d) for name, d in self._times.items()}
        if clear:
            self._times.clear()
        return out


class WorkerBase:
    role: Role

    def __init__(self, spec: WorkerSpec):
        logging.basicConfig(level=os.environ.get("PDSERVE_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # this process is this worker's (an actor's own)
        self.spec = spec
        self.worker_id = spec.worker_id
        show_node_gpus_assigned_first()  # before anything starts CUDA here
        self.engine = None  # workers.engine.engine.Engine, made in start()
        self.loop: EngineLoop | None = None
        self.transceiver = None
        self.registration = None
        self.is_draining = False
        self.inflight: set[str] = set()
        self.counters = dataclasses.asdict(WorkerCounters())
        self.hops = HopTimer()
        compile_watch.install(self.hops)  # compiles inside serving show up as hops jit.triton / jit.dynamo
        self.started_at = time.time()

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> WorkerInfo:
        """Load the model, open the transceiver, register in etcd. Returns what was registered."""
        from cluster.registration import WorkerRegistration
        from kv_transfer import make_transceiver
        from workers.engine.engine import Engine  # torch + transformers: only in the worker process

        model_path = await asyncio.to_thread(resolve_model_path, self.spec.model.path)
        self.engine = await asyncio.to_thread(Engine, self.spec.model, self.spec.engine, model_path, self.worker_id)
        self.loop = EngineLoop(self.engine, hops=self.hops)
        self.loop.start()
        self.transceiver = make_transceiver(self.spec.transfer, self.engine.kv_cache, self.worker_id)
        info = self.info()
        self.registration = WorkerRegistration(self.spec.etcd, self.spec.cluster_name, info)
        await self.registration.start()
        if not await self.registration.wait_registered(timeout_s=30):
            raise RuntimeError(f"{self.worker_id}: could not register in etcd at {self.spec.etcd.endpoints} "
                               f"within 30 s ({self.registration.last_error})")
        log.info("%s ready: %s, %d KV blocks", self.worker_id, self.engine.layout.model_id, self.engine.kv_cache.num_blocks)
        compile_watch.mark_serving()
        return info

    def info(self) -> WorkerInfo:
        import ray

        return WorkerInfo(
            worker_id=self.worker_id, role=self.role, actor_name=self.worker_id,
            address=ray.util.get_node_ip_address(), model=self.spec.model.served_model_name or "",
            kv_capacity_blocks=self.engine.kv_cache.num_blocks, compat_hash=self.engine.layout.compat_hash(),
            started_at=self.started_at,
        )

    async def drain(self, timeout_s: float = 60.0) -> bool:
        """Take no new work, let in-flight requests finish (up to timeout_s), then deregister.
        True if everything finished in time."""
        self.is_draining = True
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        finished = not self.inflight
        await self._deregister()
        return finished

    async def shutdown(self) -> None:
        self.is_draining = True
        await self._deregister()
        if self.loop is not None:
            await asyncio.to_thread(self.loop.stop)
        if self.transceiver is not None:
            self.transceiver.close()

    async def _deregister(self) -> None:
        if self.registration is not None:
            await self.registration.deregister()

    def check_accepting(self) -> None:
        if self.is_draining:
            raise WorkerDrainingError(f"worker {self.worker_id} is draining")

    async def compile_grammar(self, sampling) -> None:
        """A structured-output request's grammar compiled on a thread of its own, so that the engine
        thread finds it cached (a large schema's compile would stall every running request's step);
        InvalidRequestError if it does not compile."""
        if sampling.structured is not None and self.engine.grammars is not None:
            await asyncio.to_thread(self.engine.grammars.compile, sampling.structured)

    # -- observability -------------------------------------------------------------------------
    async def state(self, since_seq: int = -1) -> WorkerState:
        """The router's poll: load + KV events after ``since_seq`` (or a full snapshot).

        Answers at once from what the engine thread last published (EngineLoop.latest), never
        waiting for a step: a long step must not read as a dead worker. ``load.engine_stalled_s``
        says whether the engine is stuck. Raises EngineDeadError once the engine thread is gone.
        Only the rare resync (the KV event log no longer reaches back to ``since_seq``) waits for
        the engine thread."""
        snap = self.loop.latest()
        stats = snap.stats
        events, complete = self.loop.events_since(since_seq)
        snapshot = None
        last_seq = events[-1].seq if events else since_seq
        if not complete:
            snapshot, last_seq = await self.loop.call(lambda e: (tuple(e.pool.cached_hashes()), e.pool._event_seq))
            events = []
        load = WorkerLoad(
            worker_id=self.worker_id, role=self.role, num_running=stats.num_running, num_waiting=stats.num_waiting,
            num_used_blocks=stats.num_used_blocks, num_total_blocks=stats.num_total_blocks,
            num_pinned_blocks=stats.num_pinned_blocks, is_draining=self.is_draining,
            num_pending_prefill_tokens=stats.num_pending_prefill_tokens,
            engine_stalled_s=round(self.loop.stalled_s(), 3), engine_has_work=snap.has_work,
        )
        self.counters.update(num_prompt_tokens=stats.prompt_tokens_queried,
                             num_prompt_tokens_cached=stats.prompt_tokens_hit, num_preemptions=stats.num_preemptions,
                             num_import_waits=stats.num_import_waits)
        self.counters.update(self.transceiver.counters() if self.transceiver is not None else {})
        compiles, compile_s = compile_watch.serving_compiles()
        self.counters.update(num_compiles_serving=compiles, compile_seconds_serving=round(compile_s, 3))
        return WorkerState(load, tuple(events), complete, snapshot, last_seq, WorkerCounters(**self.counters))

    async def stats(self, from_snapshot: bool = False):
        """The engine's EngineStats. Default: taken on the engine thread at its next step boundary
        (waits for the step in progress). ``from_snapshot``: what the engine thread last published,
        at once (as of its last step or command; the management API's probe)."""
        if from_snapshot:
            return self.loop.latest().stats
        return await self.loop.call(lambda e: e.stats())

    async def hop_times(self, clear: bool = False) -> dict[str, tuple[float, ...]]:
        """Recent durations (s) of each named step of this worker's request path (HopTimer)."""
        return self.hops.snapshot(clear)

    async def num_inflight(self) -> int:
        return len(self.inflight)

    async def ping(self) -> str:
        return self.worker_id

    # -- KV quota ------------------------------------------------------------------------------
    async def resize(self, num_blocks: int):
        result = await self.loop.call(lambda e: e.resize(num_blocks))
        await self.registration.update_info(self.info())
        return result

    async def peer_info(self):
        """What a peer needs to read this worker's KV blocks (exchanged through Ray, never through
        NIXL's own listener)."""
        return self.transceiver.peer_info()
