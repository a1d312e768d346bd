"""Runs an Engine on its own thread and bridges it to asyncio (the worker actor's event loop).

The engine is single-threaded: every call goes through ``call``, which runs it on the engine
thread between steps. Outputs flow back per request: token deltas into an asyncio.Queue,
prefill handles into a Future. KV events go into a bounded log that routers poll by sequence.

Readers that must not wait for a step (the router's poll) read what the engine thread publishes
on its own: ``latest()`` (the engine's stats as of its last step or batch of commands) and
``stalled_s()`` (since the thread last went round its loop: a step, a batch of commands or an idle
50 ms wait). A busy or idle engine keeps that heartbeat fresh; one stuck inside a step does not.

No waiter is left hanging: when the engine thread dies or stops, every pending call, stream and
handle fails with EngineDeadError; a prefill that ends without a handle (the engine finished it
with an error) fails its handle future with the engine's message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from workers.protocol import FinishReason, KVEvent, KVHandle, RequestFailedError, TokenDelta

if TYPE_CHECKING:
    from workers.engine.engine import Engine, EngineStats

log = logging.getLogger(__name__)
T = TypeVar("T")

# After a step the snapshot is taken again only this long after the last one (or when the engine
# runs out of work): Engine.stats() walks every request (26 us with 64 running on a CPU), which is
# 2 % of a 1.3 ms GPU decode step; polls come every 100 ms. A batch of commands always publishes.
_STEP_SNAPSHOT_INTERVAL_S = 0.01


class EngineDeadError(RuntimeError):
    pass


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's stats as the engine thread last published them (replaced, never mutated)."""

    stats: EngineStats
    has_work: bool  # requests running, waiting or in flight in the engine
    at: float  # time.monotonic() when taken


class EngineLoop:
    def __init__(self, engine: Engine, event_log_size: int = 10_000, hops=None):
        self.engine = engine
        self.hops = hops  # a worker's HopTimer (or None): where a prefill's time goes on this side
        self._loop: asyncio.AbstractEventLoop | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue] = {}
        self._handles: dict[str, asyncio.Future] = {}
        self._events: collections.deque[KVEvent] = collections.deque(maxlen=event_log_size)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.error: BaseException | None = None
        self.num_steps = 0
        self.last_step_at = time.monotonic()
        # written by the engine thread only, read from the event loop without a lock (a reference
        # or float assignment is atomic in CPython)
        self._snapshot: EngineSnapshot | None = None
        self._heartbeat_at = time.monotonic()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish()  # the engine thread is not running yet: this thread may read the engine
        self._heartbeat_at = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout=10)
        if self.error is None:
            self.error = EngineDeadError("engine stopped")
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_all, self.error)

    # -- calls from the event loop -------------------------------------------------------------
    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread; exceptions propagate to the caller."""
        if self.error is not None:
            raise EngineDeadError(f"engine thread died: {self.error!r}")
        fut = self._loop.create_future()
        self._commands.put((fn, fut))
        return await fut

    def latest(self) -> EngineSnapshot:
        """The engine's stats as of its last step or batch of commands, at once (never waits for a
        step). Whatever a finished ``call`` did is in it. Raises EngineDeadError once the engine
        thread died or stopped, as ``call`` does: a dead engine never answers from an old snapshot."""
        if self.error is not None:
            raise EngineDeadError(f"engine thread died: {self.error!r}")
        return self._snapshot

    def stalled_s(self) -> float:
        """Seconds since the engine thread last went round its loop: a few ms while it steps or
        idles, the length of the step it is in while it steps slowly, growing while it is stuck."""
        return max(0.0, time.monotonic() - self._heartbeat_at)

    def open_stream(self, request_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def expect_handle(self, request_id: str) -> asyncio.Future:
        fut = self._loop.create_future()
        self._handles[request_id] = fut
        return fut

    def drop_handle(self, request_id: str) -> None:
        self._handles.pop(request_id, None)

    def fail_handle(self, request_id: str, exc: BaseException) -> None:
        """Make the awaited handle of request_id raise exc (no-op if nobody waits for one)."""
        fut = self._handles.pop(request_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def events_since(self, seq: int) -> tuple[list[KVEvent], bool]:
        """KV events with seq > ``seq``; the flag is False when some were already dropped from
        the log (the caller must resync from a full snapshot)."""
        events = list(self._events)
        complete = not events or events[0].seq <= seq + 1
        return [e for e in events if e.seq > seq], complete

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._heartbeat_at = time.monotonic()
                self._drain_commands(block=not self.engine.has_work())
                if self.engine.has_work():
                    t0 = time.perf_counter()
                    out = self.engine.step()
                    done = time.perf_counter()
                    self.num_steps += 1
                    self.last_step_at = time.monotonic()
                    if (not self.engine.has_work()
                            or self.last_step_at - self._snapshot.at >= _STEP_SNAPSHOT_INTERVAL_S):
                        self._publish()  # before the outputs go out: a finished request is in it
                    if self.hops is not None:
                        # every step; with async scheduling a step() call returns the previous
                        # step's outputs, so this is the engine's cadence, not one step's GPU time
                        self.hops.add("engine.step", done - t0)
                        if out.handles:
                            self.hops.add("engine.handle_step", done - t0)  # the step that finished a prefill
                    self._dispatch(out.deltas, out.handles, done)
                elif self.engine.reap_retired_segments():  # idle: a shrink finishes without a next step
                    self._publish()
                self._events.extend(self.engine.take_kv_events())
        except BaseException as e:  # the engine is broken: fail every waiter loudly
            log.exception("engine thread died")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)

    def _drain_commands(self, block: bool) -> None:
        try:
            item = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        answers = []
        try:
            while item is not None:
                fn, fut = item
                try:
                    result, exc = fn(self.engine), None
                except Exception as e:
                    result, exc = None, e
                answers.append((fut, result, exc))
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    break
            self._publish()  # before any caller hears back: what a finished call did is in the snapshot
        finally:
            for fut, result, exc in answers:
                self._loop.call_soon_threadsafe(_resolve, fut, result, exc)

    def _publish(self) -> None:
        self._snapshot = EngineSnapshot(self.engine.stats(), self.engine.has_work(), time.monotonic())

    def _dispatch(self, deltas: list[TokenDelta], handles: list[KVHandle], done: float) -> None:
        if deltas:
            self._loop.call_soon_threadsafe(self._deliver, deltas, done)
        for h in handles:
            self._loop.call_soon_threadsafe(self._deliver_handle, h, done)

    def _deliver(self, deltas: list[TokenDelta], done: float) -> None:
        if self.hops is not None:
            self.hops.add("engine.delta_delivery", time.perf_counter() - done)  # engine thread -> event loop
        for d in deltas:
            q = self._streams.get(d.request_id)
            if q is not None:
                q.put_nowait(d)
            elif d.finished and d.request_id in self._handles:  # a prefill-only request ended without a handle
                fut = self._handles.pop(d.request_id)
                if not fut.done():
                    fut.set_exception(RequestFailedError(
                        f"prefill of {d.request_id} ended without a KV handle: {d.error or d.finish_reason.value}"))

    def _deliver_handle(self, handle: KVHandle, done: float) -> None:
        if self.hops is not None:
            self.hops.add("engine.handle_delivery", time.perf_counter() - done)
        fut = self._handles.pop(handle.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(handle)
        else:  # nobody waits for it any more (cancelled): free the pinned blocks
            self._commands.put((lambda e: e.release_handle(handle.request_id), self._loop.create_future()))

    def _fail_all(self, exc: BaseException) -> None:
        """Runs on the event loop once the engine thread is gone (self.error is set, so no new
        call is queued after this drains the queue)."""
        for rid, q in self._streams.items():
            q.put_nowait(TokenDelta(rid, (), "", finish_reason=FinishReason.ERROR, error=f"engine failed: {exc!r}"))
        for fut in self._handles.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(f"engine failed: {exc!r}"))
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                _resolve(item[1], None, EngineDeadError(f"engine failed: {exc!r}"))


def _resolve(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
