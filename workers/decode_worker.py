"""DecodeWorker: runs a request end to end from the decode side and streams its tokens.

    generate(req):
      local prefill  if the router sent no prefill worker, or this worker's own cache leaves
                     fewer than local_prefill_threshold_tokens uncached (conditional disaggregation),
                     or the request wants prompt logprobs (only a local prefill computes them)
      otherwise      for each prefill candidate (best first, bounded attempts):
                       handle = prefill.prefill(...)                 blocks pinned there
                       reservation = engine.reserve_import(...)      blocks allocated here
                       transceiver.read(remote blocks -> our blocks) ONE READ, deadline
                       prefill.release(...)                          raises if the lease expired;
                                       awaited only when the READ did not provably finish inside
                                       the lease (_lease_held_through), else confirmed off the path
                       engine.commit_import(first token)             decode continues here
                     every failure frees the blocks on both sides and tries the next candidate;
                     when all fail, prefill locally (counted as a fallback, logged)
      layer-wise     (transfer.layerwise) per candidate:
                       reservation = engine.reserve_import(...)      blocks allocated here first
                       expect_layers; prefill.prefill(... LayerwiseTarget)  it WRITEs each layer
                       receive_layers + the prefill's reply (first token; nothing pinned there)
                       engine.commit_import(first token)
                     on failure our blocks are freed only once the prefill worker confirmed that no
                     WRITE is in flight (abort_layerwise) or died (layerwise.py's ownership rule)
      then stream TokenDeltas (coalesced per step) until finished.

Two ways out for the deltas:
    generate(req)        a Ray stream per request (one Ray object per message)
    run(req) + subscribe(subscriber_id)
                         run() pushes req's deltas into its subscriber's mailbox and returns when the
                         request finished; subscribe() is ONE Ray stream per (router process, decode
                         worker) whose every item is everything that subscriber's requests produced
                         since the previous item (vLLM's engine-core -> frontend output batching).
                         Ending the subscription cancels its runs (workers/subscribers.py).

Every wait is bounded: the prefill by req.prefill_timeout_s, each call to the prefill worker
around the READ (handshake, renew, release) and the READ itself by transfer.deadline_s, and the
whole request by its deadline. A client mistake (InvalidRequestError) is raised at once, never
retried elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

import ray

from kv_transfer.errors import LeaseExpiredError, StalePeerError
from workers.engine.block_pool import NoFreeBlocks
from workers.layerwise_import import LayerwiseImport
from workers.protocol import (FinishReason, GenerateRequest, InvalidRequestError, KVHandle, PrefillRequest,
                              Role, TokenDelta, merge_deltas)
from workers.subscribers import SUBSCRIPTION_TTL_S, Subscribers
from workers.worker_base import WorkerBase

log = logging.getLogger(__name__)


class DecodeWorkerImpl(LayerwiseImport, WorkerBase):
    role = Role.DECODE

    def __init__(self, spec):
        super().__init__(spec)
        self._background: set[asyncio.Task] = set()  # layer-wise aborts, releases still being confirmed
        self._prefill_actors: dict[str, object] = {}  # prefill worker id -> its actor handle
        self.subscribers = Subscribers()

    async def subscribe(self, subscriber_id: str, ttl_s: float = SUBSCRIPTION_TTL_S):
        """Async generator of list[TokenDelta] (a Ray streaming method): everything the runs of
        this subscriber produced since the previous item, as soon as there is anything (no holding:
        at most one item per engine step under load). It ends when cancelled by the router, or when
        ttl_s passed without a renew_subscription (its router is gone: Ray ends neither this call
        nor the runs when the caller dies); then every run still pushing into it is cancelled:
        aborted, KV freed."""
        if not ttl_s > 0:
            raise InvalidRequestError(f"ttl_s must be > 0, got {ttl_s}", "ttl_s")
        box = self.subscribers.box_for(subscriber_id, subscribing=True)
        box.renewed_at = time.monotonic()
        try:
            while True:
                left = box.renewed_at + ttl_s - time.monotonic()
                if left <= 0:
                    log.warning("%s: token stream %s not renewed for %.0f s: its router is gone", self.worker_id,
                                subscriber_id, ttl_s)
                    return
                deltas = await box.take(timeout_s=left)
                if deltas:
                    yield deltas
        finally:
            n = self.subscribers.close(subscriber_id)
            if n:
                log.info("%s: token stream %s ended; cancelled its %d running requests", self.worker_id,
                         subscriber_id, n)

    async def renew_subscription(self, subscriber_id: str) -> bool:
        """The subscriber's keepalive; False when its subscription is not live here."""
        return self.subscribers.renew(subscriber_id)

    async def run(self, req: GenerateRequest) -> None:
        """generate(req), its deltas pushed into the mailbox of req.subscriber_id instead of yielded;
        returns once the finished delta is pushed. Raises what generate raises (WorkerDrainingError,
        InvalidRequestError, ...): the router sees it on this call's ObjectRef. Cancelling this
        call aborts the request here and on the prefill worker, as cancelling generate does.
        The stream interval applies as in generate (auto included): on CPU, 1 token a message made
        the per-delta work after the stream (push, fan-out, SSE) the limit (benchmarks/README.md)."""
        if req.subscriber_id is None:
            raise InvalidRequestError("run() needs a GenerateRequest with a subscriber_id", "subscriber_id")
        box = self.subscribers.box_for(req.subscriber_id)
        task = asyncio.current_task()
        box.runs.add(task)
        try:
            async with contextlib.aclosing(self.generate(req)) as deltas:
                async for delta in deltas:
                    box.push(delta)
        finally:
            box.runs.discard(task)

    async def subscriptions(self) -> dict[str, int]:
        """Requests running per live subscription (diagnostics, tests)."""
        return self.subscribers.running()

    async def generate(self, req: GenerateRequest):
        """Async generator of TokenDeltas (a Ray streaming method). Cancelling it aborts the
        request here and releases anything pinned on the prefill worker."""
        # routed -> here: the actor call's transit and its wait for this worker's event loop (the
        # router stamps arrival_time as it dispatches; same host's clock, or NTP-close hosts')
        self.hops.add("dispatch", max(0.0, time.time() - req.arrival_time))
        self.check_accepting()
        rid = req.request_id
        deadline = req.arrival_time + req.deadline_s
        stream = self.loop.open_stream(rid)
        self.inflight.add(rid)
        t0 = time.perf_counter()
        held: list[TokenDelta] = []  # deltas not sent yet: fewer than the stream interval's tokens
        try:
            await self.compile_grammar(req.sampling)
            first = await self._start(req, deadline)
            if first is not None:
                self.hops.add("first_delta", time.perf_counter() - t0)
                yield first
                if first.finished:
                    return
            while True:
                delta = await asyncio.wait_for(stream.get(), timeout=max(0.001, deadline - time.time()))
                held += [delta] + _drain(stream)
                interval = req.stream_interval or auto_stream_interval(len(self.inflight))
                if first is not None and not held[-1].finished and sum(len(d.token_ids) for d in held) < interval:
                    continue
                merged = merge_deltas(held)
                held = []
                if first is None:
                    first = merged
                    self.hops.add("first_delta", time.perf_counter() - t0)
                yield merged
                if merged.finished:
                    self.counters["num_requests_finished"] += 1
                    return
        except asyncio.TimeoutError:  # the tokens still held go out with the error
            yield merge_deltas(held + [TokenDelta(rid, (), "", finish_reason=FinishReason.ERROR,
                                            error=f"request deadline of {req.deadline_s:.0f} s exceeded")])
        finally:
            self.inflight.discard(rid)
            self.loop.close_stream(rid)
            await asyncio.shield(self.loop.call(lambda e: e.abort(rid)))  # no-op when it finished

    async def _start(self, req: GenerateRequest, deadline: float) -> TokenDelta | None:
        """Get the request going; returns the first delta when it came from a remote prefill."""
        rid, prompt = req.request_id, list(req.prompt_token_ids)
        if req.prefill_candidates:
            with self.hops.time("cache_lookup"):
                # read here, not through the engine thread: a round trip there waits for the running
                # step to end (14-18 ms p50 at 64 req/s on an H200); the count only picks local vs
                # remote prefill, and reserve_import / add_request recheck the cache exactly. A prompt
                # whose logprobs are wanted is computed whole wherever it is prefilled.
                cached = (self.engine.num_cached_prompt_tokens(prompt, req.cache_salt)
                          if req.sampling.prompt_logprobs is None else 0)
            if len(prompt) - cached >= self.spec.local_prefill_threshold_tokens:
                for attempt, prefill_id in enumerate(req.prefill_candidates[: self.spec.max_prefill_attempts]):
                    if attempt:
                        self.counters["num_prefill_retries"] += 1
                    try:
                        return await self._remote_prefill(req, prefill_id, deadline)
                    except (asyncio.CancelledError, InvalidRequestError):
                        raise
                    except Exception as e:
                        log.warning("%s: remote prefill on %s failed (%s: %s)", rid, prefill_id, type(e).__name__, e)
                    if time.time() >= deadline:
                        # nothing is left to try for: generate() ends the request with the deadline error.
                        # A local prefill now would only load this worker with a request nobody awaits.
                        raise asyncio.TimeoutError
                self.counters["num_prefill_fallbacks"] += 1
                log.warning("%s: every prefill attempt failed; prefilling locally", rid)
        self.counters["num_local_prefills"] += 1
        with self.hops.time("local_add"):
            await self.loop.call(lambda e: e.add_request(rid, prompt, req.sampling, req.cache_salt))
        return None

    async def _remote_prefill(self, req: GenerateRequest, prefill_id: str, deadline: float) -> TokenDelta:
        prefill = self._prefill_actor(prefill_id)
        try:
            # one token (lm-eval's loglikelihood, a classifier): the first token ends it, no KV moves
            if self.spec.transfer.layerwise and req.sampling.max_tokens > 1:
                return await self._remote_prefill_layerwise(req, prefill_id, prefill, deadline)
            return await self._remote_prefill_read(req, prefill_id, prefill, deadline)
        except BaseException:
            # the next request looks the name up again (a worker started anew under it)
            self._prefill_actors.pop(prefill_id, None)
            raise

    def _prefill_actor(self, prefill_id: str):
        """The actor handle of a prefill worker, looked up once: ray.get_actor is a blocking GCS
        round trip, on this event loop, on every request's critical path otherwise."""
        actor = self._prefill_actors.get(prefill_id)
        if actor is None:
            if len(self._prefill_actors) >= _MAX_CACHED_ACTORS:
                self._prefill_actors.clear()  # workers come and go: forget the long gone ones
            actor = self._prefill_actors[prefill_id] = ray.get_actor(prefill_id, namespace=self.namespace)
        return actor

    async def _remote_prefill_read(self, req: GenerateRequest, prefill_id: str, prefill, deadline: float) -> TokenDelta:
        rid = req.request_id
        ttl = self.spec.transfer.lease_ttl_s
        preq = PrefillRequest(rid, req.prompt_token_ids, req.sampling, req.cache_salt, ttl, reader_id=self.worker_id)
        t_sent = time.monotonic()  # before the prefill worker can pin anything (see _lease_held_through)
        ref = prefill.prefill.remote(preq)
        try:
            wait_s = min(req.prefill_timeout_s, deadline - time.time())
            handle: KVHandle = await asyncio.wait_for(ref, timeout=max(0.001, wait_s))
            self.hops.add("prefill_call", time.monotonic() - t_sent)
        except BaseException:
            ray.cancel(ref)  # the prefill side aborts; a handle made in the meantime expires with its lease
            _release_quietly(prefill, rid)
            raise
        if handle.final:  # its first token ended the request: no blocks pinned there, nothing to READ
            self.counters["num_final_first_tokens"] += 1
            return await self.loop.call(lambda e: e.finish_import(rid, list(req.prompt_token_ids), req.sampling,
                                                                  handle, req.cache_salt))
        reservation, released, release_later = None, False, False
        call_s = self.spec.transfer.deadline_s  # any one call to the prefill worker around the READ

        def commit(e):
            return e.commit_import(rid, handle=handle)

        try:
            with self.hops.time("reserve"):
                reservation, renewed_until = await self._reserve(req, prefill, deadline)
            if renewed_until is not None:  # the lease was renewed while we waited for blocks: READ up to then
                handle = dataclasses.replace(handle, expires_at=renewed_until)
            with self.hops.time("handshake"):
                await asyncio.wait_for(self.transceiver.ensure_peer(prefill_id, handle.kv_epoch, handle.compat_hash,
                                                                    lambda: prefill.peer_info.remote()), call_s)
            # [0, n) already cached here | [n, len) to READ; n == len when every block is (a prompt
            # of whole blocks we hold): the handle still brings the first token, nothing to read
            n = reservation.num_local_cached_blocks
            if n < len(handle.block_ids):
                with self.hops.time("read"):
                    await self._read(prefill_id, prefill, handle, reservation, deadline)
            released = True  # from here the prefill side frees its blocks whatever release() answers
            # what we read is known good when the READ provably ended inside the lease: then commit
            # first and send the release (a Ray call, ~1 ms of this loop) once the first token left
            release_later = _lease_held_through(t_sent, time.monotonic(), ttl)
            if not release_later:
                # raises LeaseExpiredError (what we read may be stale); no answer in time counts as that too
                with self.hops.time("release"):
                    await asyncio.wait_for(prefill.release.remote(rid), call_s)
        except BaseException:
            if reservation is not None:
                await asyncio.shield(self.loop.call(lambda e: e.abort(rid)))
            if not released:
                _release_quietly(prefill, rid)
            raise
        t_commit = time.perf_counter()
        try:
            first = await self.loop.call(commit)
        finally:
            if release_later:  # whatever the commit did: the prefill side must free its blocks
                self._release_in_background(rid, prefill_id, prefill)
        self.hops.add("commit", time.perf_counter() - t_commit)
        return first

    def _release_in_background(self, rid: str, prefill_id: str, prefill) -> None:
        """Release a handle whose READ provably finished inside its lease: the answer no longer
        decides anything, so nobody waits for it; a LeaseExpiredError means the proof's premise
        broke, so say it loudly. Never raises (the prefill side frees by lease if this is lost)."""
        call_s = self.spec.transfer.deadline_s

        async def confirm():
            try:
                await asyncio.wait_for(prefill.release.remote(rid), call_s)
            except LeaseExpiredError as e:
                log.error("%s: %s expired the lease of a handle whose READ finished well inside its TTL (%s); "
                          "the monotonic clocks of the two workers disagree", rid, prefill_id, e)
            except Exception as e:  # the blocks are freed there anyway: by this release or by the lease
                log.warning("%s: release on %s not confirmed (%s: %s)", rid, prefill_id, type(e).__name__, e)

        task = asyncio.ensure_future(confirm())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read(self, prefill_id: str, prefill, handle: KVHandle, reservation, deadline: float) -> None:
        """READ the handle's blocks we lack. A StalePeerError (the prefill side added a segment
        after our handshake) is answered with one fresh handshake and one more READ."""
        n = reservation.num_local_cached_blocks
        tx = self.transceiver
        for attempt in range(2):
            budget_s = min(self.spec.transfer.deadline_s, min(deadline, handle.expires_at) - time.time())
            try:
                await tx.read(prefill_id, handle.block_ids[n:], reservation.block_ids[n:], budget_s,
                              num_tokens=handle.num_tokens - n * self.engine.block_size, request_id=handle.request_id)
                return
            except StalePeerError as e:
                if attempt:
                    raise
                log.info("%s: %s; handshaking with %s again", handle.request_id, e, prefill_id)
                tx.remove_peer(prefill_id)
                await asyncio.wait_for(tx.ensure_peer(prefill_id, handle.kv_epoch, handle.compat_hash,
                                                      lambda: prefill.peer_info.remote()), self.spec.transfer.deadline_s)

    async def _reserve(self, req: GenerateRequest, prefill, deadline: float):
        """Blocks for the import; while none are free, wait (renewing the remote lease, if any).
        Returns (reservation, the lease's latest expiry if it was renewed, else None). While this
        waits, the engine admits no local request that arrived later into the blocks it wants
        (Scheduler.want_for_import)."""
        rid, prompt = req.request_id, list(req.prompt_token_ids)
        renew_every = self.spec.transfer.lease_ttl_s / 3
        last_renew, renewed_until = time.monotonic(), None
        while True:
            try:
                reservation = await self.loop.call(lambda e: e.reserve_import(rid, prompt, req.sampling,
                                                                              req.cache_salt))
                return reservation, renewed_until
            except NoFreeBlocks:
                if time.time() >= deadline:
                    raise asyncio.TimeoutError  # generate() ends the request with the deadline error
                if prefill is not None and time.monotonic() - last_renew > renew_every:
                    renewed_until = await asyncio.wait_for(prefill.renew.remote(rid), self.spec.transfer.deadline_s)
                    last_renew = time.monotonic()
                await asyncio.sleep(0.01)

    @property
    def namespace(self) -> str:
        return f"pdserve-{self.spec.cluster_name}"  # router.cluster_view.ray_namespace


_MAX_CACHED_ACTORS = 1024
# auto stream interval: one more token per message for every this many requests streaming here.
# Each message is a Ray streaming item, and the worker's event loop shares the GIL with the engine
# thread: on CPU (tiny model, decode_heavy at 24 req/s) 4 tokens a message gave 1.5x the tokens/s
# and half the TPOT of 1 (benchmarks/README.md, "Stream interval").
AUTO_STREAMS_PER_TOKEN = 8


def auto_stream_interval(num_streaming: int) -> int:
    """Tokens per message when the request did not fix it: 1 below AUTO_STREAMS_PER_TOKEN streams."""
    return 1 + num_streaming // AUTO_STREAMS_PER_TOKEN


def _lease_held_through(t_sent: float, t_read_done: float, ttl_s: float) -> bool:
    """True when the handle's lease provably outlived the READ, so release()'s answer
    (LeaseExpiredError or not) is known before it arrives.

    The prefill worker pins the blocks after it received the prefill call, so after t_sent, and
    its LeaseTable frees them no earlier than ttl_s after that on its monotonic clock (renew() only
    moves that later). Both times here are this worker's monotonic clock: no wall-clock skew
    between hosts enters, only the rate difference of two monotonic clocks (NTP slews at most
    500 ppm), which half the TTL covers many times over. Past that bound, ask release() and wait."""
    return t_read_done - t_sent < ttl_s / 2


def _release_quietly(prefill, request_id: str) -> None:
    """Best effort: free a handle we will not use (the lease frees it anyway if this is lost)."""
    try:
        prefill.release.remote(request_id)
    except Exception:
        pass


def _drain(q: asyncio.Queue) -> list[TokenDelta]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


DecodeWorker = ray.remote(DecodeWorkerImpl)
