"""Config sections the router owns: how requests are routed, and the input limits at the door."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # cache_aware is the default: on 2x H100 with ~12k-token chat contexts it cut p50 TTFT 2.6-3.0x
    # against round-robin where kv_aware managed 1.0-2.1x (benchmarks/README.md, "GPU, third round")
    policy: Literal["kv_aware", "cache_aware", "round_robin"] = Field(
        "cache_aware", description="cache_aware: the SGLang router's rule (router/policy.py); kv_aware: Dynamo's cost "
                                   "(decode) and TensorRT-LLM's score (prefill); round_robin: load-blind baseline")
    overlap_weight: float = Field(1.0, ge=0, description="cost = overlap_weight * new_prefill_blocks + active_decode_blocks")
    local_prefill_threshold_tokens: int = Field(
        32, ge=0, description="Decode prefills locally when the uncached prompt part is below this"
    )
    prefill_queue_threshold: int = Field(
        0, ge=0, description="Decode prefills locally when every prefill worker has at least this many requests "
                             "queued (Dynamo's conditional disaggregation on queue length); 0 = never")
    # None (see conditional_mode): queue when prefill_queue_threshold > 0 (configs written before
    # this field keep their meaning), else off. Off until a GPU run says otherwise (benchmarks/README.md).
    conditional_disaggregation: Literal["off", "queue", "ttft"] | None = Field(
        None, description="Besides local_prefill_threshold_tokens, when the decode worker prefills a long prompt "
                          "itself. off: never; queue: while every prefill worker has prefill_queue_threshold "
                          "requests waiting; ttft: when its estimated time to first token there is smaller than "
                          "on the chosen prefill worker (pending prefill tokens / learned prefill rate, "
                          "+ ttft_transfer_allowance_s remotely), up to local_prefill_max_pending_tokens. "
                          "Default: queue if prefill_queue_threshold > 0, else off")
    # CPU, 384-token prompts, a 256-token decode budget: a cap of 384 (one prompt) kept TPOT p90
    # at 19-48 ms, 768 (two) let it reach 120 ms (benchmarks/README.md, "conditional disaggregation
    # on estimated TTFT")
    local_prefill_max_pending_tokens: int = Field(
        1024, ge=0, description="ttft: never leave a decode worker more than this many prompt tokens to prefill "
                                "(its pending ones + this prompt's): each one is computed inside its decode steps, "
                                "so this bounds how much local prefill stretches its TPOT; about 1-2x the decode "
                                "workers' engine.max_num_batched_tokens")
    prefill_rate_prior_tokens_per_s: float = Field(
        50000, gt=0, description="ttft: a prefill worker's prompt tokens per second until measured from its polls")
    local_prefill_rate_prior_tokens_per_s: float = Field(
        10000, gt=0, description="ttft: a decode worker's local prefill rate (prompt tokens per second, computed "
                                 "between its decodes) until measured from its polls")
    prefill_rate_window_s: float = Field(
        2.0, gt=0, description="ttft: time constant of the per-worker prefill rate average (EWMA over polls)")
    ttft_transfer_allowance_s: float = Field(
        0.01, ge=0, description="ttft: added to the remote estimate for the KV transfer and the extra hop")
    stream_interval_tokens: int | Literal["auto"] = Field(
        "auto", description="A decode worker streams a request's tokens in messages of at least this many (the first "
                            "token and the last message go at once): fewer per-request stream messages when many "
                            "streams share a worker, whose host side is then the limit (vLLM's stream_interval). "
                            "auto: 1 while the worker streams fewer than 8 requests, one more per 8 streams")
    token_streams: Literal["per_worker", "per_request"] = Field(
        "per_worker", description="per_worker: one Ray stream per (router replica, decode worker) carries, per message, "
                                  "every token that worker produced for this replica's requests since the last one "
                                  "(vLLM's engine-core output batching); stream_interval_tokens applies to each "
                                  "request as with per_request. per_request: one Ray stream per request "
                                  "(DecodeWorker.generate), one Ray object per message")
    min_prefill_workers: int = Field(1, ge=0, description="Readiness gate: 503 until this many prefill workers registered")
    min_decode_workers: int = Field(1, ge=1, description="Readiness gate: 503 until this many decode workers registered")
    temperature: float = Field(
        0.0, ge=0, description="Decode choice: 0 = lowest cost; > 0 = softmax sampling over min-max normalised costs"
    )
    cache_threshold: float = Field(
        0.5, ge=0, le=1, description="cache_aware: follow the longest cached prefix when it covers at least this "
                                     "fraction of the prompt")
    balance_abs_threshold: int = Field(
        8, ge=0, description="cache_aware: loads (running + waiting requests) are imbalanced when max - min exceeds "
                             "this and max > balance_rel_threshold * min; then the least loaded worker wins")
    balance_rel_threshold: float = Field(1.5, ge=1, description="cache_aware: see balance_abs_threshold")
    prefill_queue_weight: float = Field(
        0.25, ge=0, description="Prefill score = matched_blocks - prefill_queue_weight * queued_requests, highest wins"
    )
    zero_overlap_window_requests: int = Field(
        50, ge=0, description="Zero-overlap alarm window in requests (0 = off)"
    )
    zero_overlap_min_repeats: int = Field(
        5, ge=1, description="Alarm only if at least this many requests in the window repeated a seen first block"
    )
    # A worker that never sends REMOVED must not grow the index without limit: past the cap, the
    # oldest stored hashes of that worker are forgotten (an under-estimate, never a wrong route).
    index_max_blocks_per_worker: int = Field(1_000_000, ge=1, description="Prefix index cap per worker")
    index_max_workers: int = Field(4096, ge=1, description="Prefix index cap on distinct workers")
    recent_decisions: int = Field(100, ge=0, description="Routing decisions kept for inspection")
    # A worker answers its poll at once from what its engine thread last published; three polls in
    # a row without an answer (a dead, frozen or unreachable actor) take it out of routing.
    poll_timeout_s: float = Field(
        2.0, gt=0, description="A worker's answer to one state poll (every 0.1 s); 3 unanswered in a row: unhealthy")
    # 10 s: above the slowest healthy step seen on CI's 2 CPU cores (a long CPU prefill, several
    # seconds), below limits.worker_stall_timeout_s (15 s) so that no new request goes to a stuck
    # engine while the ones on it wait for that deadline to migrate them
    engine_stall_timeout_s: float = Field(
        10.0, gt=0, description="A worker whose engine thread made no progress (no step, command or idle wake-up "
                                "finished) for this long is unhealthy: out of routing and readiness until it "
                                "moves again. Keep it above the longest engine step a healthy worker takes")

    @property
    def conditional_mode(self) -> Literal["off", "queue", "ttft"]:
        """conditional_disaggregation, resolved (the field stays None in dumps, so a dumped config
        with prefill_queue_threshold overridden later still means queue)."""
        if self.conditional_disaggregation is None:
            return "queue" if self.prefill_queue_threshold > 0 else "off"
        return self.conditional_disaggregation

    @model_validator(mode="after")
    def _conditional_mode(self) -> "RouterConfig":
        mode, threshold = self.conditional_disaggregation, self.prefill_queue_threshold
        if mode == "queue" and threshold == 0:
            raise ValueError("conditional_disaggregation 'queue' needs prefill_queue_threshold >= 1")
        elif mode in ("off", "ttft") and threshold > 0:
            raise ValueError(f"prefill_queue_threshold = {threshold} applies only to conditional_disaggregation "
                             f"'queue', not {mode!r}: set one or the other")
        return self

    @field_validator("stream_interval_tokens")
    @classmethod
    def _interval(cls, v: int | str) -> int | str:
        if v != "auto" and v < 1:
            raise ValueError(f"must be 'auto' or >= 1 tokens, got {v}")
        return v


class LimitsConfig(BaseModel):
    """Input limits at the door, and the deadlines that bound every wait of a request."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: int = Field(4096, ge=1)
    max_tokens: int = Field(2048, ge=1)
    max_body_bytes: int = Field(1048576, ge=1, description="Larger request bodies: 413")
    max_concurrent_requests: int = Field(256, ge=1, description="Over this: 429 with Retry-After")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 429")
    request_timeout_s: float = Field(300, gt=0, description="The whole request, from arrival; no wait is longer")
    prefill_timeout_s: float = Field(
        60, gt=0, description="A decode worker's wait for one prefill worker's KV handle; then the next candidate")
    worker_stall_timeout_s: float = Field(
        15, gt=0, description="A decode worker that streams nothing and, for this long, answers no poll or reports "
                              "an engine making no progress (a stuck step, a hung process) is treated as failed: "
                              "its requests migrate")
    max_migrations: int = Field(
        3, ge=0, description="Decode-worker failures one request survives (each one migrates it); then a clear error")
