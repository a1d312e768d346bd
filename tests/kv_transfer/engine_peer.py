"""EnginePeer: a real Engine plus a real transceiver and lease table, in its own process (a Ray
actor). The prefill role pins its handles' blocks under leases; the decode role imports them.

Engine calls happen on the actor's one method thread only; lease expiries reported by the reaper
thread are queued and applied (engine.release_handle) at the next method call, as a worker's
engine loop would.
"""

from __future__ import annotations

import dataclasses
import queue

from kv_transfer import make_transceiver
from kv_transfer.config import TransferConfig
from kv_transfer.lease import LeaseTable
from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.engine import Engine
from workers.protocol import KVHandle, LayerwiseTarget, PeerInfo, SamplingParams


class EnginePeer:
    def __init__(self, model_dir: str, worker_id: str, backend: str = "nixl", blocks_per_segment: int = 16,
                 max_num_batched_tokens: int = 64):
        cfg = EngineConfig(block_size=4, num_kv_blocks=128, blocks_per_segment=blocks_per_segment,
                           max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=8)
        self.engine = Engine(ModelConfig(device="cpu", dtype="float32"), cfg, model_dir, worker_id=worker_id)
        self.tx = make_transceiver(TransferConfig(backend=backend), self.engine.kv_cache, worker_id, host="127.0.0.1")
        self._expired: queue.Queue[str] = queue.Queue()
        self.expired: list[str] = []
        self.leases = LeaseTable(on_expired=self._expired.put, metrics=self.tx.metrics, reap_interval_s=0.02)
        self.leases.start()

    def _apply_expiries(self) -> None:
        while not self._expired.empty():
            rid = self._expired.get()
            self.engine.release_handle(rid)
            self.expired.append(rid)

    # -- both roles ----------------------------------------------------------------------------
    def peer_info(self) -> PeerInfo:
        return self.tx.peer_info()

    def blocks_in_use(self) -> dict:
        self._apply_expiries()
        s = self.engine.stats()
        return {"used": s.num_used_blocks, "pinned": s.num_pinned_blocks, "requests": len(self.engine.requests),
                "free": s.num_free_blocks, "target": s.num_target_blocks, "leased": self.leases.num_pinned_blocks}

    def expired_ids(self) -> list[str]:
        self._apply_expiries()
        return list(self.expired)

    # -- prefill role --------------------------------------------------------------------------
    def prefill(self, request_id: str, prompt: list[int], sampling: SamplingParams, ttl_s: float) -> KVHandle:
        self._apply_expiries()
        self.engine.add_request(request_id, prompt, sampling, prefill_only=True)
        while True:
            out = self.engine.step()
            for handle in out.handles:
                expires_at = self.leases.pin(handle.request_id, handle.block_ids, ttl_s)
                return dataclasses.replace(handle, lease_ttl_s=ttl_s, expires_at=expires_at)

    def release(self, request_id: str) -> None:
        """Raises LeaseExpiredError if the lease ran out (the engine blocks are freed either way)."""
        try:
            self.leases.release(request_id)
        finally:
            self._apply_expiries()
        self.engine.release_handle(request_id)

    # -- decode role ---------------------------------------------------------------------------
    def import_kv(self, handle: KVHandle, prompt: list[int], sampling: SamplingParams, prefill_info: PeerInfo) -> int:
        """Reserve blocks, handshake if needed, READ the blocks we lack. Returns blocks read.
        On any failure the reservation is aborted (our blocks freed) and the error re-raised."""
        res = self.engine.reserve_import(handle.request_id, prompt, sampling)
        try:
            self.tx.ensure_peer_blocking(handle.worker_id, handle.kv_epoch, handle.compat_hash, lambda: prefill_info)
            n = res.num_local_cached_blocks
            if n < len(res.block_ids):
                self.tx.read_blocking(handle.worker_id, list(handle.block_ids[n:]), list(res.block_ids[n:]), 10.0,
                                      num_tokens=handle.num_tokens if n == 0 else None,
                                      request_id=handle.request_id)
            return len(res.block_ids) - n
        except BaseException:
            self.engine.abort(handle.request_id)
            raise

    # -- layer-wise (decode role: reserve, receive, commit; prefill role: stream while computing) --
    def reserve_layerwise(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> LayerwiseTarget:
        res = self.engine.reserve_import(request_id, prompt, sampling)
        n = res.num_local_cached_blocks
        self.tx.expect_layers(request_id)
        return LayerwiseTarget(request_id, self.engine.worker_id, res.block_ids[n:], self.engine.kv_cache.epoch,
                               self.tx.compat_hash, first_block_index=n)

    def prefill_layerwise(self, request_id: str, prompt: list[int], sampling: SamplingParams,
                          target: LayerwiseTarget, decode_info: PeerInfo) -> tuple[KVHandle, int]:
        """Prefill with the engine's per-layer hook WRITing into the decode blocks; returns the
        handle (nothing pinned: our blocks are freed after the last WRITE) and the number of
        engine steps the prompt took (chunked prefill when > 1)."""
        self.tx.ensure_peer_blocking(target.worker_id, target.kv_epoch, target.compat_hash, lambda: decode_info)
        senders = []

        def factory(block_ids):
            senders.append(self.tx.layerwise_sender(target, block_ids[target.first_block_index:], 30.0))
            return senders[-1].layer_done

        self.engine.add_request(request_id, prompt, sampling, prefill_only=True, on_layer_done=factory)
        steps = 0
        while True:
            out = self.engine.step()
            steps += 1
            if out.handles:
                (handle,) = out.handles
                senders[0].finish()
                self.engine.release_handle(request_id)
                return handle, steps

    def receive_and_commit(self, handle: KVHandle, num_blocks: int) -> list[int]:
        self.tx.receive_layers_blocking(handle.request_id, 30.0, num_blocks)
        return self.commit_and_decode(handle)

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def commit_and_decode(self, handle: KVHandle) -> list[int]:
        """The KV is in our blocks: continue from the handle's first token until the request ends."""
        first = self.engine.commit_import(handle.request_id, handle.first_token_id, handle.first_logprob)
        tokens = list(first.token_ids)
        finished = first.finished
        while not finished:
            for delta in self.engine.step().deltas:
                if delta.request_id == handle.request_id:
                    tokens += delta.token_ids
                    finished = finished or delta.finished
        return tokens
