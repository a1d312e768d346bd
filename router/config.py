"""The router's config sections (`router:` and `limits:` in the YAML); cluster/config.py assembles them.

Unknown keys are errors (extra="forbid") so a typo never silently keeps a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: Literal["kv_aware", "round_robin"] = "kv_aware"
    # Decode cost (Dynamo's form, lowest wins): overlap_weight * new_prefill_blocks + active_decode_blocks
    overlap_weight: float = Field(1.0, ge=0)
    # 0 = always the lowest cost; > 0 = sample with softmax over min-max normalised costs
    temperature: float = Field(0.0, ge=0)
    # Prefill score (TRT's form, highest wins): matched_blocks - prefill_queue_weight * queued_requests
    prefill_queue_weight: float = Field(0.25, ge=0)
    # Conditional disaggregation: the decode worker prefills locally when fewer prompt tokens than
    # this are missing from its own cache.
    local_prefill_threshold_tokens: int = Field(32, ge=0)
    min_prefill_workers: int = Field(1, ge=0)
    min_decode_workers: int = Field(1, ge=1)
    # Zero-overlap alarm: over this many requests (0 = off), every overlap was zero although at least
    # zero_overlap_min_repeats of them repeated an earlier request's first block.
    zero_overlap_window_requests: int = Field(50, ge=0)
    zero_overlap_min_repeats: int = Field(5, ge=1)
    # Bounds on the global prefix index's memory (a worker that never sends REMOVED cannot grow it
    # without limit): the oldest stored hashes of a worker past its cap are forgotten.
    index_max_blocks_per_worker: int = Field(1_000_000, ge=1)
    index_max_workers: int = Field(4096, ge=1)
    # How many recent routing decisions the endpoint keeps for inspection.
    recent_decisions: int = Field(100, ge=0)


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: int = Field(4096, ge=1)
    max_tokens: int = Field(2048, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=1)
    max_concurrent_requests: int = Field(256, ge=1)
    request_timeout_s: float = Field(300, gt=0)
