"""Grows and shrinks an engine's KV memory by whole segments, never touching a block in use.

Shrinking marks the chosen segments *retiring*: their free blocks leave the pool at once (cached
ones are evicted, emitting REMOVED events), their in-use blocks stay valid until their requests
free them, and the segment's memory is returned when its last block retires (``reap``, called
every engine step).
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.engine.block_pool import BlockPool
from workers.engine.kv_cache import KVCache


@dataclass(frozen=True)
class ResizeResult:
    target_blocks: int  # the quota asked for, rounded up to whole segments
    num_blocks: int  # blocks allocated right now (retiring segments still count until returned)
    num_usable_blocks: int  # blocks that can be handed out (excludes retiring segments)
    num_pending_blocks: int  # blocks of retiring segments still holding in-use blocks

    @property
    def done(self) -> bool:
        return self.num_blocks == self.target_blocks


class SegmentResizer:
    def __init__(self, kv_cache: KVCache, pool: BlockPool):
        self.kv_cache = kv_cache
        self.pool = pool
        self.retiring: set[int] = set()

    @property
    def bps(self) -> int:
        return self.kv_cache.layout.blocks_per_segment

    @property
    def target_blocks(self) -> int:
        return (len(self.kv_cache.segments) - len(self.retiring)) * self.bps

    def resize(self, num_blocks: int, before_free=None) -> ResizeResult:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        want = -(-num_blocks // self.bps)
        active = [i for i in sorted(self.kv_cache.segments) if i not in self.retiring]
        if want > len(active):
            # grow: first take back segments still retiring, then allocate new ones
            for index in sorted(self.retiring)[: want - len(active)]:
                self.retiring.discard(index)
                self.pool.unretire_blocks(list(self.kv_cache.block_ids_of(index)))
                active.append(index)
            for _ in range(want - len(active)):
                index = self.kv_cache.add_segment()
                self.pool.add_blocks(self.kv_cache.block_ids_of(index))
        elif want < len(active):
            # shrink: retire the segments with the fewest blocks in use (highest index on ties)
            def in_use(index: int) -> int:
                return sum(1 for b in self.kv_cache.block_ids_of(index) if self.pool.ref_count[b] > 0)

            for index in sorted(active, key=lambda i: (in_use(i), -i))[: len(active) - want]:
                self.retiring.add(index)
                self.pool.retire_blocks(list(self.kv_cache.block_ids_of(index)))
        self.reap(before_free)
        return self.result()

    def reap(self, before_free=None) -> bool:
        """Return the memory of retiring segments whose blocks are all free; True if any went.
        before_free() is called once before the first segment goes (the engine waits there for
        queued steps)."""
        returned = False
        for index in sorted(self.retiring):
            ids = list(self.kv_cache.block_ids_of(index))
            if all(self.pool.is_retired(b) for b in ids):
                if before_free is not None:
                    before_free()
                    before_free = None
                self.pool.drop_blocks(ids)
                self.kv_cache.remove_segment(index)
                self.retiring.discard(index)
                returned = True
        return returned

    def result(self) -> ResizeResult:
        total = self.kv_cache.num_blocks
        pending = len(self.retiring) * self.bps
        return ResizeResult(self.target_blocks, total, total - pending, pending)
