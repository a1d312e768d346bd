"""The KV cache memory layout: what a transceiver needs to address any block by byte offset.

An engine's KV memory is a set of *segments*; each segment is one contiguous tensor

    segment[layer, kv, local_block, slot, kv_head, dim]
    shape  [num_layers, 2, blocks_per_segment, block_size, num_kv_heads, head_dim]   (kv: 0 = K, 1 = V)

Global block ids are ``segment_index * blocks_per_segment + local_block``. Segments are added and
removed whole (the quota resizer grows and shrinks the cache by segments), so a block id keeps its
address for as long as its segment lives.

Inside a segment, the bytes of one (layer, kv, block) are contiguous, ``block_bytes`` long, at

    offset(layer, kv, local_block) = ((layer * 2 + kv) * blocks_per_segment + local_block) * block_bytes

so a run of consecutive local blocks of one (layer, kv) is one contiguous range: one transfer
descriptor per (layer, kv, run).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# torch is imported only where a torch dtype is asked for: this module travels in every message
# (workers/protocol.py), and the router and manager processes should not pay for importing torch.

LAYOUT_NAME = "layer-kv-block-slot-head-dim/v1"
PDSERVE_VERSION = "0.1.0"

_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def dtype_name(dtype) -> str:
    """torch dtype -> its name here ("float32" | "bfloat16" | "float16")."""
    name = str(dtype).removeprefix("torch.")
    if name not in _ELEMENT_BYTES:
        raise ValueError(f"unsupported KV dtype {dtype}; supported: {sorted(_ELEMENT_BYTES)}")
    return name


def torch_dtype(name: str):
    if name not in _ELEMENT_BYTES:
        raise ValueError(f"unsupported KV dtype {name!r}; supported: {sorted(_ELEMENT_BYTES)}")
    import torch

    return getattr(torch, name)


@dataclass(frozen=True)
class KVLayout:
    """Shape and identity of an engine's KV cache. Frozen; crosses process boundaries."""

    model_id: str  # identity of the weights' architecture (see ModelRunner.model_id)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int  # tokens per block
    dtype: str  # "float32" | "bfloat16" | "float16"
    blocks_per_segment: int
    layout: str = LAYOUT_NAME
    version: str = PDSERVE_VERSION

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    @property
    def element_bytes(self) -> int:
        return _ELEMENT_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one (layer, K or V, block)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_bytes

    @property
    def bytes_per_block_all_layers(self) -> int:
        """Bytes a block occupies across all layers, K and V: the unit of KV memory accounting."""
        return 2 * self.num_layers * self.block_bytes

    @property
    def segment_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.blocks_per_segment, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def segment_bytes(self) -> int:
        return self.blocks_per_segment * self.bytes_per_block_all_layers

    def locate(self, block_id: int) -> tuple[int, int]:
        """Global block id -> (segment index, local block index)."""
        if block_id < 0:
            raise ValueError(f"negative block id {block_id}")
        return divmod(block_id, self.blocks_per_segment)

    def offset(self, layer: int, kv: int, local_block: int) -> int:
        """Byte offset of (layer, kv, local_block) inside its segment."""
        return ((layer * 2 + kv) * self.blocks_per_segment + local_block) * self.block_bytes

    # -- compatibility -------------------------------------------------------------------------
    # Two engines can exchange blocks iff these fields are equal. blocks_per_segment is addressing,
    # not meaning, so it is left out: each side addresses the other's blocks by its own layout.
    COMPAT_FIELDS = ("model_id", "num_layers", "num_kv_heads", "head_dim", "block_size", "dtype", "layout", "version")

    def compat_fields(self) -> dict[str, object]:
        d = asdict(self)
        return {k: d[k] for k in self.COMPAT_FIELDS}

    def compat_hash(self) -> str:
        blob = json.dumps(self.compat_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def compat_diff(self, other: "KVLayout") -> dict[str, tuple[object, object]]:
        """Fields that differ: {field: (ours, theirs)}; empty when compatible."""
        mine, theirs = self.compat_fields(), other.compat_fields()
        return {k: (mine[k], theirs[k]) for k in self.COMPAT_FIELDS if mine[k] != theirs[k]}


def coalesce_runs(block_ids: list[int], blocks_per_segment: int | None = None) -> list[tuple[int, int]]:
    """Split block ids into maximal runs of consecutive ids: [(first_id, count), ...], in order.
    With blocks_per_segment, a run never crosses a segment boundary (segments are separate tensors).

    >>> coalesce_runs([4, 5, 6, 9, 2, 3])
    [(4, 3), (9, 1), (2, 2)]
    >>> coalesce_runs([3, 4, 5], blocks_per_segment=4)
    [(3, 1), (4, 2)]
    """
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        crosses = blocks_per_segment is not None and b % blocks_per_segment == 0
        if runs and runs[-1][0] + runs[-1][1] == b and not crosses:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
