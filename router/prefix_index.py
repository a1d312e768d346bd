"""PrefixIndex: the router's global view of which worker holds which prefix-cache block.

Keys are chained block hashes (workers/block_hash.py): a hash names a block *and its whole prefix*,
and the cache salt is folded into the root, so tenants never match each other's blocks.

Representation: each hash maps to an int bitmask of worker slots (slot i = bit i). A request's
overlap is then one walk down its chain, AND-ing masks, stopping as soon as no worker is left:

    request hashes  h0   h1   h2   h3
    alive mask      abc  ab   ab   b     -> c matches 1, a matches 3, b matches 4

Slots of removed workers are reused, so masks stay as narrow as the live worker count.

Event stream contract (per worker): events carry seq 0, 1, 2, ... A gap (or a first event that is
not seq 0) marks the worker as needing a resync; its events are still applied, since a missed
STORED only under-estimates and a missed REMOVED only over-estimates (a slower route, never a wrong
answer). ``reset_worker`` applies a full snapshot taken as of some seq and clears the flag. seq 0
starts a new stream (a restarted worker with an empty cache): what was known of it is dropped.
CLEARED is itself a full snapshot (empty), so it also clears the flag. Events at or below the
last applied seq are stale duplicates and are ignored.

Memory is bounded: at most ``max_workers`` workers and ``max_blocks_per_worker`` hashes each (past
the cap the worker's oldest stored hashes are forgotten).
"""

from __future__ import annotations

import heapq
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from workers.protocol import KVEvent, KVEventKind

log = logging.getLogger(__name__)


class TooManyWorkersError(RuntimeError):
    """An event or snapshot names a new worker while the index already tracks max_workers."""


@dataclass
class _WorkerState:
    slot: int
    # hash -> None, oldest first; the order picks what to forget when over the cap
    hashes: OrderedDict[int, None] = field(default_factory=OrderedDict)
    next_seq: int | None = 0  # the seq the next event must carry; None: take the next one as baseline
    needs_resync: bool = False


@dataclass(frozen=True)
class PrefixIndexStats:
    num_workers: int
    num_blocks: int  # distinct hashes
    num_entries: int  # (hash, worker) pairs
    num_events: int
    num_seq_gaps: int
    num_stale_events: int
    num_forgotten: int  # hashes dropped by the per-worker cap
    workers_needing_resync: tuple[str, ...]


class PrefixIndex:
    """Chained block hash -> set of workers holding it. Not thread-safe: one owner task applies
    events and answers queries (the router's event loop)."""

    def __init__(self, max_blocks_per_worker: int = 1_000_000, max_workers: int = 4096):
        if max_blocks_per_worker < 1 or max_workers < 1:
            raise ValueError("max_blocks_per_worker and max_workers must be >= 1")
        self.max_blocks_per_worker = max_blocks_per_worker
        self.max_workers = max_workers
        self._owners: dict[int, int] = {}  # hash -> bitmask of worker slots; never 0
        self._workers: dict[str, _WorkerState] = {}
        self._slot_worker: dict[int, str] = {}
        self._free_slots: list[int] = []  # a min-heap
        self._num_entries = 0
        self._num_events = 0
        self._num_seq_gaps = 0
        self._num_stale = 0
        self._num_forgotten = 0

    # -- queries ---------------------------------------------------------------------------------
    def overlap(self, request_hashes: Sequence[int]) -> dict[str, int]:
        """Matched prefix blocks per worker: consecutive blocks from the start that the worker holds.

        Only workers with at least one matched block appear (absent = 0). One pass over the chain,
        stopping at the first block no worker holds.
        """
        result: dict[str, int] = {}
        if not request_hashes:
            return result
        alive = -1  # all bits: every worker is still matching before block 0
        for i, h in enumerate(request_hashes):
            mask = alive & self._owners.get(h, 0)
            if i > 0:
                self._record(alive & ~mask, i, result)
            alive = mask
            if not alive:
                return result
        self._record(alive, len(request_hashes), result)
        return result

    def _record(self, dropped: int, num_matched: int, out: dict[str, int]) -> None:
        while dropped:
            low = dropped & -dropped
            out[self._slot_worker[low.bit_length() - 1]] = num_matched
            dropped ^= low

    def needs_resync(self, worker_id: str) -> bool:
        state = self._workers.get(worker_id)
        return state is not None and state.needs_resync

    def workers_needing_resync(self) -> list[str]:
        return sorted(w for w, s in self._workers.items() if s.needs_resync)

    def worker_ids(self) -> list[str]:
        return sorted(self._workers)

    def num_blocks_of(self, worker_id: str) -> int:
        state = self._workers.get(worker_id)
        return 0 if state is None else len(state.hashes)

    def next_seq(self, worker_id: str) -> int | None:
        """The seq the worker's next event should carry (None: unknown worker, or no baseline)."""
        state = self._workers.get(worker_id)
        return None if state is None else state.next_seq

    def stats(self) -> PrefixIndexStats:
        return PrefixIndexStats(
            num_workers=len(self._workers),
            num_blocks=len(self._owners),
            num_entries=self._num_entries,
            num_events=self._num_events,
            num_seq_gaps=self._num_seq_gaps,
            num_stale_events=self._num_stale,
            num_forgotten=self._num_forgotten,
            workers_needing_resync=tuple(self.workers_needing_resync()),
        )

    # -- updates ---------------------------------------------------------------------------------
    def apply(self, event: KVEvent) -> None:
        """Apply one worker's KV event (see the module docstring for the seq contract)."""
        if event.seq < 0:
            raise ValueError(f"KV event seq must be >= 0, got {event.seq} from {event.worker_id!r}")
        self._num_events += 1
        state = self._workers.get(event.worker_id)
        if state is None:
            state = self._add_worker(event.worker_id)
        expected = state.next_seq
        if event.seq == 0 and expected != 0:
            # A new stream: the worker restarted with an empty cache; what we knew is gone.
            self._drop_hashes(state)
            state.needs_resync = False
        elif expected is not None and event.seq < expected:
            self._num_stale += 1
            return
        elif expected is not None and event.seq > expected and event.kind is not KVEventKind.CLEARED:
            self._num_seq_gaps += 1
            if not state.needs_resync:
                log.warning("KV event gap from worker %s: expected seq %d, got %d; it needs a resync",
                            event.worker_id, expected, event.seq)
            state.needs_resync = True

        if event.kind is KVEventKind.STORED:
            self._store(state, event.block_hashes)
        elif event.kind is KVEventKind.REMOVED:
            self._remove(state, event.block_hashes)
        elif event.kind is KVEventKind.CLEARED:
            # An empty snapshot: consistent whatever was missed before it.
            self._drop_hashes(state)
            state.needs_resync = False
        else:
            raise ValueError(f"unknown KV event kind {event.kind!r}")
        state.next_seq = event.seq + 1

    def apply_all(self, events: Iterable[KVEvent]) -> None:
        for event in events:
            self.apply(event)

    def reset_worker(self, worker_id: str, block_hashes: Iterable[int], seq: int | None = None) -> None:
        """Replace everything known of ``worker_id`` with a full snapshot of its cached hashes.

        ``seq``: the last event seq the snapshot includes; later events must follow it. None: the
        snapshot's position in the stream is unknown, so the next event is taken as the baseline.
        """
        state = self._workers.get(worker_id)
        if state is None:
            state = self._add_worker(worker_id)
        if seq is not None and seq < 0:
            raise ValueError(f"snapshot seq must be >= 0 or None, got {seq}")
        self._drop_hashes(state)
        self._store(state, block_hashes)
        state.next_seq = None if seq is None else seq + 1
        state.needs_resync = False

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that left the cluster (no-op if unknown); its slot is reused."""
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        self._drop_hashes(state)
        del self._slot_worker[state.slot]
        heapq.heappush(self._free_slots, state.slot)

    # -- internals -------------------------------------------------------------------------------
    def _add_worker(self, worker_id: str) -> _WorkerState:
        if len(self._workers) >= self.max_workers:
            raise TooManyWorkersError(
                f"prefix index already tracks {self.max_workers} workers; cannot add {worker_id!r} "
                "(raise router.index_max_workers or remove departed workers)")
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)  # the lowest free slot keeps masks narrow
        else:
            slot = len(self._slot_worker)
        state = _WorkerState(slot=slot)
        self._workers[worker_id] = state
        self._slot_worker[slot] = worker_id
        return state

    def _store(self, state: _WorkerState, block_hashes: Iterable[int]) -> None:
        bit = 1 << state.slot
        hashes = state.hashes
        for h in block_hashes:
            if h in hashes:
                hashes.move_to_end(h)
                continue
            hashes[h] = None
            self._owners[h] = self._owners.get(h, 0) | bit
            self._num_entries += 1
        while len(hashes) > self.max_blocks_per_worker:
            old, _ = hashes.popitem(last=False)
            self._unset(old, bit)
            self._num_forgotten += 1

    def _remove(self, state: _WorkerState, block_hashes: Iterable[int]) -> None:
        bit = 1 << state.slot
        hashes = state.hashes
        for h in block_hashes:
            if h in hashes:
                del hashes[h]
                self._unset(h, bit)

    def _drop_hashes(self, state: _WorkerState) -> None:
        bit = 1 << state.slot
        for h in state.hashes:
            self._unset(h, bit)
        state.hashes.clear()

    def _unset(self, h: int, bit: int) -> None:
        mask = self._owners[h] & ~bit
        if mask:
            self._owners[h] = mask
        else:
            del self._owners[h]
        self._num_entries -= 1
