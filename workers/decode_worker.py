"""DecodeWorker: runs a request end to end from the decode side and streams its tokens.

    generate(req):
      local prefill  if the router sent no prefill worker, or this worker's own cache leaves
                     fewer than local_prefill_threshold_tokens uncached (conditional disaggregation)
      otherwise      for each prefill candidate (best first, bounded attempts):
                       handle = prefill.prefill(...)                 blocks pinned there
                       reservation = engine.reserve_import(...)      blocks allocated here
                       transceiver.read(remote blocks -> our blocks) ONE READ, deadline
                       prefill.release(...)                          raises if the lease expired
                       engine.commit_import(first token)             decode continues here
                     every failure frees the blocks on both sides and tries the next candidate;
                     when all fail, prefill locally (counted as a fallback, logged)
      then stream TokenDeltas (coalesced per step) until finished.

Every wait is bounded: the prefill by req.prefill_timeout_s, each call to the prefill worker
around the READ (handshake, renew, release) and the READ itself by transfer.deadline_s, and the
whole request by its deadline. A client mistake (InvalidRequestError) is raised at once, never
retried elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray

from workers.engine.block_pool import NoFreeBlocks
from workers.protocol import (FinishReason, GenerateRequest, InvalidRequestError, KVHandle, PrefillRequest,
                              RequestFailedError, Role, TokenDelta)
from workers.worker_base import WorkerBase

log = logging.getLogger(__name__)


class DecodeWorkerImpl(WorkerBase):
    role = Role.DECODE

    async def generate(self, req: GenerateRequest):
        """Async generator of TokenDeltas (a Ray streaming method). Cancelling it aborts the
        request here and releases anything pinned on the prefill worker."""
        self.check_accepting()
        rid = req.request_id
        deadline = req.arrival_time + req.deadline_s
        stream = self.loop.open_stream(rid)
        self.inflight.add(rid)
        try:
            first = await self._start(req, deadline)
            if first is not None:
                yield first
                if first.finished:
                    return
            while True:
                delta = await asyncio.wait_for(stream.get(), timeout=max(0.001, deadline - time.time()))
                merged = _merge([delta] + _drain(stream))
                yield merged
                if merged.finished:
                    self.counters["num_requests_finished"] += 1
                    return
        except asyncio.TimeoutError:
            yield TokenDelta(rid, (), "", finish_reason=FinishReason.ERROR,
                             error=f"request deadline of {req.deadline_s:.0f} s exceeded")
        finally:
            self.inflight.discard(rid)
            self.loop.close_stream(rid)
            await asyncio.shield(self.loop.call(lambda e: e.abort(rid)))  # no-op when it finished

    async def _start(self, req: GenerateRequest, deadline: float) -> TokenDelta | None:
        """Get the request going; returns the first delta when it came from a remote prefill."""
        rid, prompt = req.request_id, list(req.prompt_token_ids)
        if req.prefill_candidates:
            cached = await self.loop.call(lambda e: e.num_cached_prompt_tokens(prompt, req.cache_salt))
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
                self.counters["num_prefill_fallbacks"] += 1
                log.warning("%s: every prefill attempt failed; prefilling locally", rid)
        self.counters["num_local_prefills"] += 1
        await self.loop.call(lambda e: e.add_request(rid, prompt, req.sampling, req.cache_salt))
        return None

    async def _remote_prefill(self, req: GenerateRequest, prefill_id: str, deadline: float) -> TokenDelta:
        rid, prompt = req.request_id, list(req.prompt_token_ids)
        prefill = ray.get_actor(prefill_id, namespace=self.namespace)
        ttl = self.spec.transfer.lease_ttl_s
        preq = PrefillRequest(rid, req.prompt_token_ids, req.sampling, req.cache_salt, ttl)
        ref = prefill.prefill.remote(preq)
        try:
            wait_s = min(req.prefill_timeout_s, deadline - time.time())
            handle: KVHandle = await asyncio.wait_for(ref, timeout=max(0.001, wait_s))
        except BaseException:
            ray.cancel(ref)  # the prefill side aborts; a handle made in the meantime expires with its lease
            _release_quietly(prefill, rid)
            raise
        reservation, released = None, False
        call_s = self.spec.transfer.deadline_s  # any one call to the prefill worker around the READ
        try:
            reservation = await self._reserve(req, prefill, deadline)
            await asyncio.wait_for(self.transceiver.ensure_peer(prefill_id, handle.kv_epoch, handle.compat_hash,
                                                                lambda: prefill.peer_info.remote()), call_s)
            # [0, n) already cached here | [n, len) to READ; n == len when every block is (a prompt
            # of whole blocks we hold): the handle still brings the first token, nothing to read
            n = reservation.num_local_cached_blocks
            if n < len(handle.block_ids):
                budget_s = min(self.spec.transfer.deadline_s, min(deadline, handle.expires_at) - time.time())
                await self.transceiver.read(prefill_id, handle.block_ids[n:], reservation.block_ids[n:], budget_s,
                                            num_tokens=handle.num_tokens - n * self.engine.block_size,
                                            request_id=rid)
            released = True  # from here the prefill side frees its blocks whatever release() answers
            # raises LeaseExpiredError (what we read may be stale); no answer in time counts as that too
            await asyncio.wait_for(prefill.release.remote(rid), call_s)
        except BaseException:
            if reservation is not None:
                await asyncio.shield(self.loop.call(lambda e: e.abort(rid)))
            if not released:
                _release_quietly(prefill, rid)
            raise
        return await self.loop.call(lambda e: e.commit_import(
            rid, handle.first_token_id, handle.first_logprob, handle.first_top_logprobs, handle.num_cached_tokens))

    async def _reserve(self, req: GenerateRequest, prefill, deadline: float):
        """Blocks for the import; while none are free, wait (renewing the remote lease)."""
        rid, prompt = req.request_id, list(req.prompt_token_ids)
        renew_every = self.spec.transfer.lease_ttl_s / 3
        last_renew = time.monotonic()
        while True:
            try:
                return await self.loop.call(lambda e: e.reserve_import(rid, prompt, req.sampling, req.cache_salt))
            except NoFreeBlocks:
                if time.time() >= deadline:
                    raise RequestFailedError(f"{rid}: no free KV blocks on {self.worker_id} before the deadline")
                if time.monotonic() - last_renew > renew_every:
                    await asyncio.wait_for(prefill.renew.remote(rid), self.spec.transfer.deadline_s)
                    last_renew = time.monotonic()
                await asyncio.sleep(0.01)

    @property
    def namespace(self) -> str:
        return f"pdserve-{self.spec.cluster_name}"  # router.cluster_view.ray_namespace


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


def _merge(deltas: list[TokenDelta]) -> TokenDelta:
    """One message for everything a request produced since the last yield."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    lps = [lp for d in deltas for lp in (d.logprobs or ())]
    tops = [t for d in deltas for t in (d.top_logprobs or ())]
    return TokenDelta(
        request_id=last.request_id, token_ids=tuple(t for d in deltas for t in d.token_ids),
        text="".join(d.text for d in deltas), logprobs=tuple(lps) if lps else None,
        top_logprobs=tuple(tops) if tops else None, finish_reason=last.finish_reason,
        num_prompt_tokens=last.num_prompt_tokens, num_cached_tokens=last.num_cached_tokens, error=last.error,
    )


DecodeWorker = ray.remote(DecodeWorkerImpl)
