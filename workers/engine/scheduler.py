"""Continuous batching: which requests compute how many tokens this step, and their KV blocks.

Both queues are ordered by the request's priority (vLLM's: lower first), then as without it:
running by admission, waiting by arrival (a preempted request goes first among its priority).
Policy, per step, under a token budget:
1. running requests first, in that order (decodes take 1 token, unfinished prefills a chunk);
   when blocks run out, the last running request (highest priority value, newest among those) is
   preempted (blocks freed, recomputed later, cheaply, through the prefix cache);
2. then waiting requests in order, admitted only if their next chunk's blocks are free right now
   (a prefix-cache hit reuses cached blocks and skips their compute), leaving aside the blocks
   that imports which come before this request asked for (want_for_import): in (priority, time
   since waiting/arrived) order between the two. Without that, under KV pressure
   on a decode worker that also prefills locally, every freed block went to the next local
   admission and imports waited past their leases (2x H200, benchmarks/README.md); with imports
   always first, preempted and local requests starved instead.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from workers.engine.block_pool import BlockPool
from workers.engine.config import EngineConfig
from workers.engine.request import Request, RequestStatus
from workers.protocol import MAX_PRIORITY


class ImportWait(NamedTuple):
    num_blocks: int  # what the import asked for and did not get
    since: float  # time.time() of its first ask (compared with Request.arrival_time)
    last_ask: float  # time.monotonic()
    priority: int = 0  # its request's (compared with Request.priority before ``since``)


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    capacity_exhausted: list[Request] = field(default_factory=list)  # can never fit: finish them

    def __len__(self) -> int:
        return len(self.requests)


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool, block_size: int):
        self.config = config
        self.pool = pool
        self.block_size = block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_prompt_tokens_queried = 0
        self.num_prompt_tokens_hit = 0
        self.blocks_held_elsewhere = lambda: 0  # pinned/reserved blocks, set by the engine
        self.on_free = lambda req: None  # called with a request right before its blocks are freed
        # request id -> ImportWait; an entry lapses IMPORT_WAIT_TTL_S after the last ask, so a
        # caller that went away unannounced holds nothing back for long
        self.import_waits: dict[str, ImportWait] = {}
        self.num_import_waits = 0  # imports that found too few free blocks (each counted once)

    def add(self, req: Request) -> None:
        """Queue a new request: after every waiting one of its priority or a lower value."""
        _insert_after(self.waiting, req)

    def add_running(self, req: Request) -> None:
        """A request whose KV is already in place (imported): straight to decoding."""
        req.status = RequestStatus.RUNNING
        _insert_after(self.running, req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and free its blocks (finish or abort)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.free_blocks(req)

    def free_blocks(self, req: Request) -> None:
        self.on_free(req)
        self.pool.free(reversed(req.block_ids))  # tail first: head blocks stay cached longest
        req.block_ids = ()

    def want_for_import(self, request_id: str, num_blocks: int, priority: int = 0) -> None:
        """An import of ``num_blocks`` found too few free: keep them meanwhile from local requests
        that come after it (a higher priority value, or equal and arrived later)."""
        if num_blocks <= self.pool.num_blocks:  # one that can never fit holds nothing back
            wait = self.import_waits.get(request_id)
            if wait is None:
                self.num_import_waits += 1
            since = wait.since if wait is not None else time.time()
            self.import_waits[request_id] = ImportWait(num_blocks, since, time.monotonic(), priority)

    def withdraw_import(self, request_id: str) -> None:
        """The import got its blocks or was aborted: it holds nothing back any more."""
        self.import_waits.pop(request_id, None)

    def blocks_wanted_by_imports(self, arrived_at: float = float("inf"), priority: int = MAX_PRIORITY) -> int:
        """Blocks asked for by imports that come before a request of ``priority`` that arrived at
        ``arrived_at``: a lower priority value, or equal and waiting since before (default: all)."""
        return sum(w.num_blocks for w in self.waiting_imports() if (w.priority, w.since) < (priority, arrived_at))

    def waiting_imports(self) -> list[ImportWait]:
        """The imports waiting for free blocks now (lapsed ones dropped)."""
        now = time.monotonic()
        for rid in [r for r, w in self.import_waits.items() if now - w.last_ask > IMPORT_WAIT_TTL_S]:
            del self.import_waits[rid]
        return list(self.import_waits.values())

    # -- the step ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        bs, running = self.block_size, self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            # a pending token (async scheduling) is computed like a known one: its id is fed on the device
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            end = req.num_computed_tokens + n
            while len(req.block_ids) * bs < end and not self._grow(req, end):
                victim = running[-1]
                if victim is req and i == 0 and self.blocks_held_elsewhere() == 0:
                    # alone with every block of the pool and still short: it can never finish
                    running.pop()
                    batch.capacity_exhausted.append(req)
                    break
                running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is req:
                    break
            else:
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            held_back = self.blocks_wanted_by_imports(req.arrival_time, req.priority) if self.import_waits else 0
            n = self._admit(req, budget, held_back)
            if n == 0:
                break  # head of line waits for blocks
            self.waiting.popleft()
            _insert_after(self.running, req)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _admit(self, req: Request, budget: int, held_back: int = 0) -> int:
        """Give a waiting request its prefix hit and the blocks for its next chunk, past the
        ``held_back`` blocks that imports waiting since before it asked for; 0 if not now."""
        if req.num_pending:
            # preempted while its last sampled token was still on the device: it is re-admitted once
            # that token is read back (the next step), so a recompute never needs a device-only token
            return 0
        bs = self.block_size
        hits: list[int] = []
        # prompt logprobs need every prompt position's hidden state: a cached prefix has none
        if self.config.enable_prefix_caching and req.prompt_logprobs is None:
            # at least one token must be computed to get logits, and a shared cached block is never
            # written again: so the last (full or partial) block is always computed fresh
            hits = self.pool.lookup(req.block_hashes())[: (req.num_tokens - 1) // bs]
        num_cached = len(hits) * bs
        n = min(req.num_tokens - num_cached, budget)
        need = -(-(num_cached + n) // bs) - len(hits)
        if need > self.pool.num_free_after_touch(hits) - held_back:
            return 0
        self.pool.touch(hits)
        req.block_ids = tuple(hits + self.pool.allocate(need))
        req.num_computed_tokens = num_cached
        req.num_hashed_blocks = len(hits)
        req.status = RequestStatus.RUNNING
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_cached
            self.num_prompt_tokens_queried += req.num_prompt_tokens
            self.num_prompt_tokens_hit += num_cached
        return n

    def _grow(self, req: Request, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        req.block_ids += tuple(self.pool.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        self.free_blocks(req)
        req.num_computed_tokens = 0
        req.num_hashed_blocks = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        # first among its priority: before every waiting request of its priority or a higher value
        i = 0
        while i < len(self.waiting) and self.waiting[i].priority < req.priority:
            i += 1
        self.waiting.insert(i, req)


def _insert_after(queue: list[Request] | deque[Request], req: Request) -> None:
    """Put ``req`` after every request of ``queue`` with its priority or a lower value (at the end
    when all share one priority: the order without priorities)."""
    i = len(queue)
    while i > 0 and queue[i - 1].priority > req.priority:
        i -= 1
    queue.insert(i, req)


IMPORT_WAIT_TTL_S = 2.0  # the decode worker asks again every 10 ms plus one engine step
