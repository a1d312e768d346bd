"""The decode worker's layer-wise import (``transfer.layerwise``), a mixin of DecodeWorkerImpl.

    reservation = engine.reserve_import(...)      blocks allocated here first
    expect_layers; prefill.prefill(... LayerwiseTarget)  the prefill worker WRITEs each layer
    receive_layers + the prefill's reply           (first token; nothing pinned there)
    engine.commit_import(first token)

On failure our blocks are freed only once the prefill worker confirmed that no WRITE is in flight
(abort_layerwise) or died (kv_transfer/layerwise.py's ownership rule). Uses the worker's
transceiver, engine loop, spec, ``_reserve``, ``_remote_prefill_read`` and ``_background``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.exceptions import RayActorError

from kv_transfer.errors import DeadlineExceededError, PeerGoneError
from workers.protocol import GenerateRequest, KVHandle, LayerwiseTarget, PrefillRequest, TokenDelta

log = logging.getLogger(__name__)


class LayerwiseImport:
    async def _remote_prefill_layerwise(self, req: GenerateRequest, prefill_id: str, prefill,
                                        deadline: float) -> TokenDelta:
        rid, tx = req.request_id, self.transceiver
        reservation, _ = await self._reserve(req, None, deadline)
        n = reservation.num_local_cached_blocks
        if n == len(reservation.block_ids):  # every block is cached here: nothing to stream
            await self.loop.call(lambda e: e.abort(rid))
            return await self._remote_prefill_read(req, prefill_id, prefill, deadline)
        target = LayerwiseTarget(rid, self.worker_id, reservation.block_ids[n:], self.engine.kv_cache.epoch,
                                 tx.compat_hash, first_block_index=n)
        tx.expect_layers(rid)
        wait_s = max(0.001, min(req.prefill_timeout_s, deadline - time.time()))
        preq = PrefillRequest(rid, req.prompt_token_ids, req.sampling, req.cache_salt, self.spec.transfer.lease_ttl_s,
                              layerwise=target)
        prefilled = asyncio.ensure_future(_result_of(prefill.prefill.remote(preq)))
        received = asyncio.ensure_future(tx.receive_layers(rid, wait_s, len(target.block_ids)))
        try:
            # the receive's own deadline (named missing layers) fires first; the margin covers the reply
            await asyncio.wait({prefilled, received}, timeout=wait_s + 1.0, return_when=asyncio.FIRST_EXCEPTION)
            for part in (prefilled, received):  # the first failure (a dead prefill worker first)
                if part.done() and part.exception() is not None:
                    raise part.exception()
            if not (prefilled.done() and received.done()):
                raise DeadlineExceededError(f"{rid}: layer-wise prefill on {prefill_id} not done within {wait_s:.1f} s",
                                            request_id=rid, peer=prefill_id)
            received.result()
            handle: KVHandle = prefilled.result()
        except BaseException as e:
            tx.cancel_layers(rid, f"the transfer failed ({type(e).__name__})")
            for part in (prefilled, received):
                part.add_done_callback(_ignore_result)
            await self._abandon_layerwise(rid, prefill_id, prefill)
            if isinstance(e, RayActorError):
                tx.metrics.transfer_failed(PeerGoneError.kind)
                raise PeerGoneError(f"prefill worker {prefill_id} died during the layer-wise transfer of {rid}",
                                    request_id=rid, peer=prefill_id) from e
            raise
        return await self.loop.call(lambda e: e.commit_import(rid, handle=handle))

    async def _abandon_layerwise(self, rid: str, prefill_id: str, prefill) -> None:
        """Our reserved blocks may still receive a WRITE: keep them (under another key, so the
        request id is free for a retry) until the prefill worker confirms its sender stopped, or
        is gone; wait for that up to transfer.deadline_s here, then let it finish in the background."""
        key = await self.loop.call(lambda e: e.detach_import(rid))
        confirmed = prefill.abort_layerwise.remote(rid)

        async def free_when_safe():
            try:
                await confirmed
            except RayActorError:
                pass  # the prefill worker is gone: nothing can WRITE any more
            except Exception as e:  # answered, but not cleanly: its sender's abort() returned anyway
                log.warning("%s: abort_layerwise on %s answered %s: %s", rid, prefill_id, type(e).__name__, e)
            await self.loop.call(lambda e: e.abort(key))

        task = asyncio.ensure_future(free_when_safe())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.spec.transfer.deadline_s)
        except asyncio.TimeoutError:
            log.warning("%s: %s has not confirmed that its layer-wise sender stopped; %s's blocks stay reserved "
                        "until it does or dies", rid, prefill_id, self.worker_id)


async def _result_of(ref):
    return await ref


def _ignore_result(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: no "exception was never retrieved" noise
