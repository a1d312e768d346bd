"""KV memory: a set of equally sized segment tensors (layout in kv_transfer/layout.py).

KVCache owns the bytes only. Which block is free, cached or in use is BlockPool's business; the
engine removes a segment only after BlockPool has retired all of its blocks.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kv_transfer.layout import KVLayout


class SegmentListener(Protocol):
    """Told about every segment (e.g. a transceiver registering KV memory with NIXL)."""

    def on_segment_added(self, index: int, tensor: torch.Tensor) -> None: ...

    def on_segment_removed(self, index: int) -> None: ...


class KVCache:
    def __init__(self, layout: KVLayout, num_segments: int, device: torch.device | str = "cpu"):
        self.layout = layout
        self.device = torch.device(device)
        self.segments: dict[int, torch.Tensor] = {}
        self.epoch = 0  # bumped on every segment add/remove: peers re-handshake when it changes
        self._listeners: list[SegmentListener] = []
        for _ in range(num_segments):
            self.add_segment()

    # -- segments ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.segments) * self.layout.blocks_per_segment

    @property
    def num_bytes(self) -> int:
        return len(self.segments) * self.layout.segment_bytes

    def block_ids_of(self, index: int) -> range:
        bps = self.layout.blocks_per_segment
        return range(index * bps, (index + 1) * bps)

    def add_segment(self) -> int:
        """Allocate a new segment at the lowest free index; returns its index."""
        index = next(i for i in range(len(self.segments) + 1) if i not in self.segments)
        tensor = torch.zeros(self.layout.segment_shape, dtype=self.layout.torch_dtype, device=self.device)
        self.segments[index] = tensor
        self.epoch += 1
        for listener in self._listeners:
            listener.on_segment_added(index, tensor)
        return index

    def remove_segment(self, index: int) -> None:
        """Drop a segment's memory. The caller guarantees none of its blocks is in use."""
        for listener in self._listeners:
            listener.on_segment_removed(index)
        del self.segments[index]
        self.epoch += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the bytes back to the device, not just to torch's pool

    def add_listener(self, listener: SegmentListener) -> None:
        """Subscribe; the listener is told about the existing segments right away."""
        self._listeners.append(listener)
        for index, tensor in sorted(self.segments.items()):
            listener.on_segment_added(index, tensor)

    def remove_listener(self, listener: SegmentListener) -> None:
        self._listeners.remove(listener)

    # -- block access (used by attention and by in-process copies) -----------------------------
    def layer_view(self, segment: int, layer: int) -> torch.Tensor:
        """[2, blocks_per_segment, block_size, kv_heads, head_dim] view of one layer of a segment."""
        return self.segments[segment][layer]

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of blocks across all layers: [num_layers, 2, len(block_ids), block_size, heads, dim]."""
        parts = [self.segments[s][:, :, b] for s, b in map(self.layout.locate, block_ids)]
        return torch.stack(parts, dim=2)

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Inverse of read_blocks."""
        for i, (s, b) in enumerate(map(self.layout.locate, block_ids)):
            self.segments[s][:, :, b].copy_(data[:, :, i])
