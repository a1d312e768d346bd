"""KVPeer: one side of a KV transfer in its own process (a Ray actor or a spawned process):
a real KVCache with random contents, a real transceiver, and a lease table.

Tests drive it through its methods; everything it returns is plain data or a frozen message.
"""

from __future__ import annotations

import os
import time

import torch

from kv_transfer import make_transceiver
from kv_transfer.config import TransferConfig
from kv_transfer.layout import KVLayout
from kv_transfer.lease import LeaseTable
from workers.engine.kv_cache import KVCache
from workers.protocol import LayerwiseTarget, PeerInfo

# Llama-like but small: 4 layers, 2 KV heads of dim 16, blocks of 4 tokens (1 KiB per (layer, kv, block)).
TEST_LAYOUT = dict(model_id="test-llama", num_layers=4, num_kv_heads=2, head_dim=16, block_size=4, dtype="float32")


def make_layout(blocks_per_segment: int = 16, **overrides) -> KVLayout:
    return KVLayout(**{**TEST_LAYOUT, **overrides, "blocks_per_segment": blocks_per_segment})


class KVPeer:
    def __init__(self, worker_id: str, backend: str = "nixl", *, blocks_per_segment: int = 16, num_segments: int = 3,
                 seed: int = 0, layout_overrides: dict | None = None, nixl_num_threads: int = 0):
        self.worker_id = worker_id
        self.layout = make_layout(blocks_per_segment, **(layout_overrides or {}))
        self.cache = KVCache(self.layout, num_segments)
        self.fill(seed)
        config = TransferConfig(backend=backend, nixl_num_threads=nixl_num_threads)
        self.tx = make_transceiver(config, self.cache, worker_id, host="127.0.0.1")
        self.expired: list[str] = []
        self.leases = LeaseTable(on_expired=self.expired.append, metrics=self.tx.metrics, reap_interval_s=0.02)
        self.leases.start()
        self.num_reads = 0
        self.layer_times: dict[int, float] = {}

    # -- state ---------------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def fill(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for index, seg in sorted(self.cache.segments.items()):
            seg.copy_(torch.randn(seg.shape, generator=gen, dtype=torch.float32).to(seg.dtype))

    def zero(self) -> None:
        for seg in self.cache.segments.values():
            seg.zero_()

    def blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Bytes of the blocks, all layers, K and V (a copy): [layers, 2, n, block_size, heads, dim]."""
        return self.cache.read_blocks(block_ids)

    def segment_checksums(self) -> dict[int, float]:
        return {i: float(s.double().sum()) for i, s in self.cache.segments.items()}

    def add_segment(self, seed: int) -> tuple[int, int]:
        """Grow the cache by one segment with random contents; returns (segment index, epoch)."""
        index = self.cache.add_segment()
        gen = torch.Generator().manual_seed(seed)
        seg = self.cache.segments[index]
        seg.copy_(torch.randn(seg.shape, generator=gen).to(seg.dtype))
        return index, self.cache.epoch

    def epoch(self) -> int:
        return self.cache.epoch

    # -- handshake -----------------------------------------------------------------------------
    def peer_info(self) -> PeerInfo:
        return self.tx.peer_info()

    def add_peer(self, info: PeerInfo) -> None:
        self.tx.add_peer(info)

    def needs_handshake(self, worker_id: str, kv_epoch: int) -> bool:
        return self.tx.needs_handshake(worker_id, kv_epoch)

    def ensure_peer(self, info: PeerInfo, kv_epoch: int, compat_hash: str) -> None:
        self.tx.ensure_peer_blocking(info.worker_id, kv_epoch, compat_hash, lambda: info)

    # -- reads ---------------------------------------------------------------------------------
    def read(self, peer: str, remote_ids: list[int], local_ids: list[int], deadline_s: float = 10.0,
             num_tokens: int | None = None):
        result = self.tx.read_blocking(peer, remote_ids, local_ids, deadline_s, num_tokens=num_tokens, request_id="r")
        self.num_reads += 1
        return result

    def read_until_error(self, peer: str, remote_ids: list[int], local_ids: list[int], max_s: float = 120.0) -> int:
        """Read again and again until a read fails (re-raised); returns the count if none did."""
        end = time.monotonic() + max_s
        while time.monotonic() < end:
            self.read(peer, remote_ids, local_ids, deadline_s=30.0)
        return self.num_reads

    def reads_done(self) -> int:
        return self.num_reads

    def counters(self) -> dict:
        return self.tx.counters()

    def transport_info(self) -> dict:
        return self.tx.transport_info()

    # -- leases (prefill side) -----------------------------------------------------------------
    def pin(self, request_id: str, block_ids: list[int], ttl_s: float) -> float:
        return self.leases.pin(request_id, block_ids, ttl_s)

    def release(self, request_id: str) -> tuple[int, ...]:
        return self.leases.release(request_id)

    def expired_ids(self) -> list[str]:
        return list(self.expired)

    def num_pinned_blocks(self) -> int:
        return self.leases.num_pinned_blocks

    # -- layer-wise streaming ------------------------------------------------------------------
    def send_layers(self, target: LayerwiseTarget, src_ids: list[int], layer_delay_s: float,
                    deadline_s: float = 30.0) -> dict[int, float]:
        """Prefill side: 'compute' each layer for layer_delay_s on this thread, calling the
        sender's per-layer hook after each; returns {layer: time.time() when it was done}."""
        sender = self.tx.layerwise_sender(target, src_ids, deadline_s)
        done_at = {}
        for layer in range(self.layout.num_layers):
            time.sleep(layer_delay_s)
            done_at[layer] = time.time()
            sender.layer_done(layer)
        sender.finish()
        return done_at

    def send_layers_then_abort(self, target: LayerwiseTarget, src_ids: list[int], num_layers: int) -> None:
        sender = self.tx.layerwise_sender(target, src_ids, 30.0)
        for layer in range(num_layers):
            sender.layer_done(layer)
        sender.abort("prefill failed")

    def expect_layers(self, request_id: str) -> None:
        self.tx.expect_layers(request_id)

    def receive_layers(self, request_id: str, deadline_s: float, num_blocks: int):
        return self.tx.receive_layers_blocking(request_id, deadline_s, num_blocks)

    def close(self) -> None:
        self.leases.stop()
        self.tx.close()
