"""BlockPool: which KV block is in use, free, or free-but-cached (reusable by prefix hash).

Invariants:
- a block is in exactly one of: in use (ref_count > 0), free uncached, free cached (LRU), retiring;
- a block has a hash only if its KV is complete and valid for that hash chain;
- a hash maps to at most one block, and only to a block that holds it;
- allocation prefers never-cached blocks, then evicts the least recently freed cached block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from workers.protocol import KVEvent, KVEventKind


class NoFreeBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, worker_id: str = "", enable_caching: bool = True):
        self.worker_id = worker_id
        self.enable_caching = enable_caching
        self.ref_count: dict[int, int] = {}
        self.block_hash: dict[int, int] = {}  # block id -> hash (full, valid blocks only)
        self.cached: dict[int, int] = {}  # hash -> block id
        self._free_uncached: OrderedDict[int, None] = OrderedDict()
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self._retiring: set[int] = set()  # blocks of segments being removed: never handed out again
        self._events: list[KVEvent] = []
        self._event_seq = -1  # events are numbered 0, 1, 2, ... per worker (seq 0 = fresh cache)
        self.num_evictions = 0

    # -- capacity ------------------------------------------------------------------------------
    def add_blocks(self, block_ids: Iterable[int]) -> None:
        for b in block_ids:
            self.ref_count[b] = 0
            self._free_uncached[b] = None

    def retire_blocks(self, block_ids: list[int]) -> list[int]:
        """Stop handing these blocks out. Free ones are retired at once (cached ones evicted);
        in-use ones are marked and retire when freed. Returns the ids not yet retired (in use)."""
        busy = []
        for b in block_ids:
            self._retiring.add(b)
            if self.ref_count[b] == 0:
                self._take_free(b)
            else:
                busy.append(b)
        return busy

    def unretire_blocks(self, block_ids: list[int]) -> None:
        """Cancel a retirement (the quota grew back before the segment emptied)."""
        for b in block_ids:
            self._retiring.discard(b)
            if self.ref_count[b] == 0 and b not in self._free_uncached:
                self._free_uncached[b] = None

    def drop_blocks(self, block_ids: list[int]) -> None:
        """Forget retired, unused blocks entirely (their segment is being freed)."""
        for b in block_ids:
            if self.ref_count.get(b, 0) != 0:
                raise RuntimeError(f"block {b} is in use and cannot be dropped")
            self._retiring.discard(b)
            self.ref_count.pop(b, None)

    def is_retired(self, block_id: int) -> bool:
        return block_id in self._retiring and self.ref_count.get(block_id, 0) == 0

    @property
    def num_blocks(self) -> int:
        return len(self.ref_count)

    @property
    def num_free(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_free(self) -> int:
        return len(self._free_cached)

    @property
    def num_used(self) -> int:
        return sum(1 for c in self.ref_count.values() if c > 0)

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free_uncached:
                b, _ = self._free_uncached.popitem(last=False)
            else:
                b, _ = self._free_cached.popitem(last=False)
                self._evict(b)
            self.ref_count[b] = 1
            out.append(b)
        return out

    def num_free_after_touch(self, hits: list[int]) -> int:
        """Free blocks left once ``hits`` (prefix-cache hits) are touched: free cached hits stop being free."""
        return self.num_free - sum(1 for b in hits if self.ref_count[b] == 0)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on (possibly free-cached) blocks: a prefix-cache hit."""
        for b in block_ids:
            if self.ref_count[b] == 0:
                self._take_free(b)
            self.ref_count[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block. Callers pass a request's blocks tail first, so that a
        prefix's head blocks are evicted last."""
        for b in block_ids:
            c = self.ref_count[b]
            if c <= 0:
                raise RuntimeError(f"double free of block {b}")
            self.ref_count[b] = c - 1
            if c == 1:
                if b in self._retiring:
                    self._uncache(b)
                elif b in self.block_hash:
                    self._free_cached[b] = None
                else:
                    self._free_uncached[b] = None

    # -- prefix cache --------------------------------------------------------------------------
    def lookup(self, block_hashes: list[int]) -> list[int]:
        """Block ids of the longest cached prefix of this hash chain."""
        hits = []
        if not self.enable_caching:
            return hits
        for h in block_hashes:
            b = self.cached.get(h)
            if b is None or b in self._retiring:
                break
            hits.append(b)
        return hits

    def cache_block(self, block_id: int, block_hash: int) -> bool:
        """Publish a full, computed block under its hash. False if the hash already has a block
        (computed twice concurrently): this one then stays private and is freed uncached."""
        if not self.enable_caching or block_hash in self.cached or block_id in self._retiring:
            return False
        self.cached[block_hash] = block_id
        self.block_hash[block_id] = block_hash
        self._emit(KVEventKind.STORED, (block_hash,))
        return True

    def reset_cache(self) -> int:
        """Evict every free cached block; returns how many."""
        n = len(self._free_cached)
        while self._free_cached:
            b, _ = self._free_cached.popitem(last=False)
            self._evict(b)
            self._free_uncached[b] = None
        return n

    def cached_hashes(self) -> list[int]:
        return list(self.cached)

    # -- events --------------------------------------------------------------------------------
    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    # -- internals -----------------------------------------------------------------------------
    def _take_free(self, b: int) -> None:
        if b in self._free_cached:
            del self._free_cached[b]
        else:
            self._free_uncached.pop(b, None)
        if b in self._retiring:
            self._uncache(b)

    def _evict(self, b: int) -> None:
        self.num_evictions += 1
        self._uncache(b)

    def _uncache(self, b: int) -> None:
        h = self.block_hash.pop(b, None)
        if h is not None:
            del self.cached[h]
            self._emit(KVEventKind.REMOVED, (h,))

    def _emit(self, kind: KVEventKind, hashes: tuple[int, ...]) -> None:
        # coalesce consecutive events of one kind into one message
        if self._events and self._events[-1].kind == kind:
            last = self._events[-1]
            self._events[-1] = KVEvent(self.worker_id, kind, last.block_hashes + hashes, last.seq)
            return
        self._event_seq += 1
        self._events.append(KVEvent(self.worker_id, kind, hashes, self._event_seq))
