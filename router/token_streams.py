"""TokenStreams: one token stream per (router process, decode worker), shared by every request this
process sends that worker (router.token_streams: per_worker).

    request -> TokenStreams.open(worker_id, request_id)   registers the request's queue, THEN
            -> RequestTokens.start(actor.run.remote(req))  the worker pushes req's deltas into
               the subscription's mailbox (workers/subscribers.py)
    WorkerStream._pump: each stream item (a list[TokenDelta]) -> the queue of each delta's request;
               a delta of an unknown request (it already left) is dropped

A Ray streaming item costs the worker about as much host time as a whole decode step of a small
model, so one item per engine step for all of this process's requests replaces one per request.

Failure: when the subscription ends (the worker died, it was closed here, or the worker ended it
because no renewal came for its TTL) every request waiting on it gets StreamLost (the request
migrates); the next request to that worker id opens a new subscription (a worker restarted under
the same name is a new actor). A run() that raises (WorkerDrainingError, InvalidRequestError, a
dead worker) raises in that request's wait. Nothing closes the streams when the router process
stops: each is a lease its worker ends SUBSCRIPTION_TTL_S after the last renewal.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref

import ray
from ray.exceptions import TaskCancelledError

from workers.protocol import TokenDelta, merge_deltas
from workers.subscribers import SUBSCRIPTION_TTL_S

log = logging.getLogger(__name__)

PROCESS_ID = uuid.uuid4().hex[:12]  # this router process; each subscription adds its own number
_SWEEP_INTERVAL_S = 1.0  # how often open() closes the streams of workers that left the view


class StreamLost(RuntimeError):
    """The token stream from a decode worker ended: treated like a dead worker (the request migrates)."""


class _RunFailed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class WorkerStream:
    """One subscription to a decode worker and the task that fans its items out to requests."""

    def __init__(self, worker_id: str, actor, subscriber_id: str):
        self.worker_id, self.actor, self.subscriber_id = worker_id, actor, subscriber_id
        self.queues: dict[str, asyncio.Queue] = {}  # request (attempt) id -> its deltas
        self.last_heard_at = time.monotonic()  # the last stream item: the worker is alive
        self.failure: BaseException | None = None
        self._gen = actor.subscribe.options(num_returns="streaming").remote(subscriber_id, SUBSCRIPTION_TTL_S)
        self._pump_task = asyncio.ensure_future(self._pump())
        self._keepalive_task = asyncio.ensure_future(self._keepalive())

    @property
    def is_open(self) -> bool:
        return self.failure is None

    async def _pump(self) -> None:
        try:
            while True:
                ref = await self._gen.__anext__()
                deltas: list[TokenDelta] = await ref
                self.last_heard_at = time.monotonic()
                for d in deltas:
                    q = self.queues.get(d.request_id)
                    if q is not None:
                        q.put_nowait(d)
        except StopAsyncIteration:
            self._fail(StreamLost(f"decode worker {self.worker_id} ended token stream {self.subscriber_id}"))
        except asyncio.CancelledError:
            self._fail(StreamLost(f"token stream {self.subscriber_id} to {self.worker_id} closed"))
            raise
        except Exception as e:  # RayActorError when the worker died
            self._fail(e)

    async def _keepalive(self) -> None:
        """Renew the subscription's lease on the worker (it ends the stream and cancels our
        requests after SUBSCRIPTION_TTL_S without one: how it learns that this process died)."""
        every = SUBSCRIPTION_TTL_S / 4
        while self.failure is None:
            await asyncio.sleep(every)
            try:
                live = await asyncio.wait_for(_result_of(self.actor.renew_subscription.remote(self.subscriber_id)),
                                              timeout=every)
            except asyncio.TimeoutError:
                continue  # a busy worker: the next renewal is still well inside the TTL
            except Exception as e:  # the worker is gone: the pump sees it too
                log.debug("renewing token stream %s failed: %r", self.subscriber_id, e)
                return
            if not live:  # the worker ended it (its stream ends here next)
                return

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
            for q in self.queues.values():
                q.put_nowait(exc)

    def close(self, reason: str) -> None:
        """End the subscription: its requests get StreamLost; the worker cancels their runs."""
        self._fail(StreamLost(f"token stream {self.subscriber_id} to {self.worker_id} closed: {reason}"))
        self._pump_task.cancel()
        self._keepalive_task.cancel()
        try:
            ray.cancel(self._gen)
        except Exception as e:  # the actor is already gone
            log.debug("cancelling token stream %s failed: %r", self.subscriber_id, e)


class RequestTokens:
    """One request's deltas from a WorkerStream, and its run() call."""

    def __init__(self, stream: WorkerStream, request_id: str):
        self.stream, self.request_id = stream, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        stream.queues[request_id] = self.queue
        if stream.failure is not None:
            self.queue.put_nowait(stream.failure)
        self._ref = None
        self._pending: list = []  # an item taken while coalescing that is not a delta: next's next
        self._ran: asyncio.Future | None = None
        self._own_cancel = False

    @property
    def subscriber_id(self) -> str:
        return self.stream.subscriber_id

    def start(self, ref) -> None:
        """Watch the request's run() call: its exception ends the wait; its normal return does not
        (the finished delta is in the queue or still on its way through the stream)."""
        self._ref = ref
        self._ran = asyncio.ensure_future(_result_of(ref))
        self._ran.add_done_callback(self._on_run_done)

    def _on_run_done(self, fut: asyncio.Future) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None or self._own_cancel:
            return
        if isinstance(exc, TaskCancelledError):  # the worker ended it: its subscription ended there
            exc = StreamLost(f"decode worker {self.stream.worker_id} cancelled {self.request_id}")
        self.queue.put_nowait(_RunFailed(exc))

    async def next(self) -> TokenDelta:
        """The next delta; when this request's consumer fell behind, every delta already queued,
        merged into one (fewer, larger messages to the client, and never a wait for more)."""
        item = self._pending.pop() if self._pending else await self.queue.get()
        if isinstance(item, _RunFailed):
            raise item.exc
        if isinstance(item, BaseException):  # the stream failed: a fresh error per request
            raise StreamLost(f"token stream from decode worker {self.stream.worker_id} lost: {item!r}") from item
        batch = [item]
        while not batch[-1].finished and not self.queue.empty():
            nxt = self.queue.get_nowait()
            if not isinstance(nxt, TokenDelta):
                self._pending.append(nxt)
                break
            batch.append(nxt)
        return merge_deltas(batch)

    def heard_at(self) -> float:
        return self.stream.last_heard_at

    def close(self, cancel: bool) -> None:
        """Stop listening; with cancel, the worker aborts the request (frees its KV everywhere)."""
        if self.stream.queues.get(self.request_id) is self.queue:
            del self.stream.queues[self.request_id]
        if cancel and self._ref is not None and not self._ran.done():
            self._own_cancel = True
            try:
                ray.cancel(self._ref)
            except Exception as e:  # the actor is already gone: nothing left to cancel
                log.debug("cancelling run(%s) failed: %r", self.request_id, e)


class TokenStreams:
    """This process's streams to the decode workers of one ClusterView."""

    def __init__(self, view):
        self.view = view
        self.streams: dict[str, WorkerStream] = {}
        self._num_opened = 0
        self._swept_at = time.monotonic()

    def open(self, worker_id: str, request_id: str) -> RequestTokens:
        """Register request_id on the worker's stream (opening one if needed); call run() after."""
        self._sweep()
        actor = self.view.actor(worker_id)
        s = self.streams.get(worker_id)
        if s is not None and s.is_open and s.actor._actor_id != actor._actor_id:
            s.close("the worker was restarted under the same name")
        if s is None or not s.is_open:
            self._num_opened += 1
            s = self.streams[worker_id] = WorkerStream(worker_id, actor, f"{PROCESS_ID}-{self._num_opened}")
        return RequestTokens(s, request_id)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept_at < _SWEEP_INTERVAL_S:
            return
        self._swept_at = now
        for wid in [w for w in self.streams if w not in self.view.workers]:
            self.streams.pop(wid).close("the worker left the cluster")


_BY_VIEW: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_streams(view) -> TokenStreams:
    """The TokenStreams of this view (one per router process in practice: a Serve replica has one view)."""
    streams = _BY_VIEW.get(view)
    if streams is None:
        streams = _BY_VIEW[view] = TokenStreams(view)
    return streams


async def _result_of(ref):
    return await ref
