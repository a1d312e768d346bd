"""What the engine hands back: a step's outputs, an import reservation, its stats."""

from __future__ import annotations

from dataclasses import dataclass

from workers.protocol import KVHandle, TokenDelta


@dataclass(frozen=True)
class ImportReservation:
    request_id: str
    block_ids: tuple[int, ...]  # every block of the prompt, in order
    num_local_cached_blocks: int  # block_ids[:n] already hold this prompt's KV here: don't fetch them


@dataclass
class StepOutput:
    deltas: list[TokenDelta]
    handles: list[KVHandle]


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_pinned: int
    num_reserved: int
    num_used_blocks: int
    num_free_blocks: int
    num_cached_free_blocks: int
    num_total_blocks: int
    num_target_blocks: int
    num_pinned_blocks: int
    num_preemptions: int
    num_evictions: int
    prompt_tokens_queried: int
    prompt_tokens_hit: int
    kv_bytes: int
    num_pending_prefill_tokens: int = 0  # see WorkerLoad.num_pending_prefill_tokens
    num_waiting_imports: int = 0  # imports waiting for free KV blocks now (decode side)
    num_import_waits: int = 0  # imports that had to wait for free KV blocks, in all
