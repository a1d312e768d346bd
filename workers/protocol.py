"""Every message that crosses a process boundary (router <-> workers <-> transceivers), typed and
frozen. No free-form dicts cross actors.

A request's trip, in messages:

    router  --GenerateRequest-->  decode worker
    decode  --PrefillRequest-->   prefill worker   (unless it prefills locally)
    prefill --KVHandle-->         decode           (blocks pinned on prefill under a lease)
    decode  READs the blocks (kv_transfer), then --release--> prefill (frees the pinned blocks)
    decode  --TokenDelta*-->      router           (streamed)
    workers --KVEvent*-->         router           (prefix index), WorkerLoad (routing weights)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the client or the cluster
    ERROR = "error"  # failed; TokenDelta.error says why


class InvalidRequestError(ValueError):
    """A client mistake (bad prompt, bad parameter): maps to HTTP 400, never to a 5xx."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
MAX_STRUCTURED_SPEC_CHARS = 256 * 1024  # a structured-output schema, regex or grammar
MAX_TOP_LOGPROBS = 20  # top_logprobs and prompt_logprobs (OpenAI's and vLLM's default limit)
MIN_PRIORITY, MAX_PRIORITY = -2**31, 2**31 - 1  # SamplingParams.priority (an int32)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output text (workers/engine/structured_output.py, xgrammar):

        json_schema  spec: a JSON schema, as JSON text (OpenAI's response_format json_schema)
        json_object  any JSON object (response_format json_object); spec unused
        regex        spec: a regular expression the whole output matches
        choice       spec: a JSON list of strings; the output is one of them
        grammar      spec: an EBNF grammar (xgrammar's dialect, GBNF-like; rule root)

    ``param``: the request field it came from (named in a 400 when the spec does not compile)."""

    kind: str
    spec: str = ""
    param: str = "response_format"

    KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

    def validate(self) -> None:
        if self.kind not in self.KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(self.KINDS)}, got "
                                      f"{self.kind!r}", self.param)
        if not isinstance(self.spec, str) or len(self.spec) > MAX_STRUCTURED_SPEC_CHARS:
            raise InvalidRequestError(f"a structured-output spec is a string of at most {MAX_STRUCTURED_SPEC_CHARS} "
                                      "characters", self.param)
        if self.kind != "json_object" and not self.spec:
            raise InvalidRequestError(f"the {self.kind} for structured output is empty", self.param)


@dataclass(frozen=True)
class ReasoningMarkers:
    """A reasoning model's markers as token ids (<think>, </think>; server.reasoning_parser): a
    structured-output constraint holds after the reasoning, which stays free. ``opened``: the
    prompt opened the reasoning (the chat template ends with the start marker); otherwise the
    model's first token may open it (the start marker, besides what the grammar allows)."""

    start: int
    end: int
    opened: bool = False

    def validate(self) -> None:
        ids = (self.start, self.end)
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids) or self.start == self.end:
            raise InvalidRequestError("reasoning markers must be two different token ids >= 0", "reasoning")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # vLLM's min_p: after temperature, tokens less likely than min_p x the most likely one's
    # probability are dropped (with top-k and before top-p); 0 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # logprob of each chosen token
    top_logprobs: int = 0  # also the k most likely tokens at each step
    # Penalties on tokens the request has seen (workers/engine/penalties.py), before temperature,
    # top-k, top-p and the greedy argmax. OpenAI: logits[t] -= frequency_penalty * count[t] +
    # presence_penalty * (count[t] > 0), count over the output tokens so far; 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's extra, transformers' RepetitionPenaltyLogitsProcessor: the logit of a token in the
    # prompt or the output is divided by it when positive, multiplied when negative; 1 = off
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) pairs added to the model's logits before
    # the penalties (vLLM's order); the engine checks the ids against its vocabulary
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's extra: until the request has this many output tokens, EOS (unless ignore_eos) and its
    # stop_token_ids cannot be sampled (stop strings still apply)
    min_tokens: int = 0
    # vLLM's text options: keep the stop string that ended the output; keep special tokens' text
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's allowed_token_ids: only these tokens may be sampled (empty: any)
    allowed_token_ids: tuple[int, ...] = ()
    # Output tokens this request already produced elsewhere (a migrated request resumes with them
    # as the prompt's tail): seeded sampling draws the next token at output position
    # output_position_offset + i, so a migration does not change what a seed samples, and the
    # prompt's last output_position_offset tokens count as output for presence/frequency penalties.
    output_position_offset: int = 0
    # vLLM's prompt_logprobs (OpenAI echo + logprobs): None = off; k >= 0: the first TokenDelta
    # carries each prompt token's logprob given the tokens before it and the k most likely tokens
    # at each prompt position (TokenDelta.prompt_logprobs). The prompt is then computed in full
    # where the request decodes (no prefix-cache hit, no prefill worker: the router prefills it
    # locally), and a resumed request (migration) drops it: its first delta already carried them.
    prompt_logprobs: int | None = None
    # vLLM's priority extra (not sampling, but this is the carrier that reaches every engine a
    # request touches: prefill, decode, a migration's next decode worker): lower is served first.
    # Each engine admits waiting requests in (priority, arrival) order and preempts the running
    # request with the highest value (workers/engine/scheduler.py)
    priority: int = 0
    # structured output (OpenAI's response_format, vLLM's structured_outputs): every sampled token,
    # the prefill worker's first one included, keeps the output inside this grammar; the output
    # ends ("stop") when the grammar is complete and the model chose EOS
    structured: StructuredOutput | None = None
    # with ``structured``: the constraint starts after the model's reasoning (set by the endpoint
    # when server.reasoning_parser is on and the tokenizer has the markers as tokens of their own)
    reasoning: ReasoningMarkers | None = None

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}", "top_k")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                                      "top_logprobs")
        k = self.prompt_logprobs
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_LOGPROBS):
            raise InvalidRequestError(f"prompt_logprobs must be null or an integer in [0, {MAX_TOP_LOGPROBS}], "
                                      f"got {k!r}", "prompt_logprobs")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty", "stop")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}", name)
        rp = self.repetition_penalty
        if not (isinstance(rp, (int, float)) and math.isfinite(rp) and rp > 0):
            raise InvalidRequestError(f"repetition_penalty must be a finite number > 0, got {rp!r}",
                                      "repetition_penalty")
        # (a migrated request's max_tokens is what is left: its min_tokens counts the offset too)
        total = self.max_tokens + (self.output_position_offset if isinstance(self.output_position_offset, int) else 0)
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= total:
            raise InvalidRequestError(f"min_tokens must be an integer in [0, max_tokens={total}], got "
                                      f"{self.min_tokens!r}", "min_tokens")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}",
                                      "logit_bias")
        seen = set()
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0 or token in seen:
                raise InvalidRequestError(f"logit_bias keys must be distinct token ids >= 0, got {token!r}",
                                          "logit_bias")
            if not (isinstance(bias, (int, float)) and -100 <= bias <= 100):
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}",
                                          "logit_bias")
            seen.add(token)
        p = self.priority
        if not isinstance(p, int) or isinstance(p, bool) or not MIN_PRIORITY <= p <= MAX_PRIORITY:
            raise InvalidRequestError(f"priority must be an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {p!r}",
                                      "priority")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.allowed_token_ids):
            raise InvalidRequestError("allowed_token_ids must be token ids >= 0", "allowed_token_ids")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise InvalidRequestError("structured must be a StructuredOutput", "response_format")
            self.structured.validate()
            if self.min_tokens:  # the grammar may allow nothing but EOS before min_tokens
                raise InvalidRequestError("min_tokens cannot be combined with structured output", "min_tokens")
        if self.reasoning is not None:
            if not isinstance(self.reasoning, ReasoningMarkers):
                raise InvalidRequestError("reasoning must be ReasoningMarkers", "reasoning")
            self.reasoning.validate()
        if not isinstance(self.output_position_offset, int) or self.output_position_offset < 0:
            raise InvalidRequestError(f"output_position_offset must be an integer >= 0, got "
                                      f"{self.output_position_offset!r}", "output_position_offset")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias))


@dataclass(frozen=True)
class GenerateRequest:
    """Router -> decode worker: one request, already tokenized by the router."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    cache_salt: str | None = None
    # prefill workers to try, best first (the router's ranking); empty = prefill locally
    prefill_candidates: tuple[str, ...] = ()
    deadline_s: float = 300.0  # the whole request, from arrival
    arrival_time: float = field(default_factory=time.time)
    prefill_timeout_s: float = 60.0  # one remote prefill attempt; past it, the next candidate is tried
    # send tokens in messages of >= this many (first token and last message at once); 0: the decode
    # worker's own choice from how many requests it streams (decode_worker.auto_stream_interval)
    stream_interval: int = 0
    # DecodeWorker.run: the subscription (one per router process and decode worker) whose stream
    # carries this request's deltas; None for the per-request DecodeWorker.generate stream
    subscriber_id: str | None = None


@dataclass(frozen=True)
class PrefillRequest:
    """Decode -> prefill worker: compute the prompt's KV, sample the first token, pin the blocks."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    cache_salt: str | None = None
    lease_ttl_s: float = 30.0
    # layer-wise streaming: WRITE each layer into these decode-side blocks as it is computed; the
    # reply's KVHandle then pins nothing (every WRITE completed before it was sent)
    layerwise: "LayerwiseTarget | None" = None
    # the decode worker that will READ the blocks: if it dies, the cluster manager frees what is
    # pinned for it at once (PrefillWorker.release_reader) instead of at lease expiry
    reader_id: str | None = None


@dataclass(frozen=True)
class KVHandle:
    """Prefill -> decode: where a finished prefill's KV lives, pinned until released or expired.

    Ownership: the prefill worker owns ``block_ids`` until exactly one of these happens: the decode
    side releases the handle (after its READ), or the lease expires (then the prefill side frees
    them and a later release reports the expiry, so a late READ is detected and discarded).
    """

    request_id: str
    worker_id: str  # the prefill worker holding the blocks
    block_ids: tuple[int, ...]  # every block of the prompt, in order; the last may be partial
    num_tokens: int  # prompt tokens whose KV the blocks hold
    first_token_id: int
    first_logprob: float | None
    first_top_logprobs: tuple[tuple[int, float], ...] | None
    compat_hash: str
    kv_epoch: int  # the prefill side's segment-set version when the handle was made
    lease_ttl_s: float
    expires_at: float  # unix time
    num_cached_tokens: int = 0  # prompt tokens the prefill worker already had cached
    # SamplingParams.prompt_logprobs, computed by the prefill: as in TokenDelta (the decode side's
    # first delta carries them on)
    prompt_logprobs: tuple[float | None, ...] | None = None
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...] | None, ...] | None = None
    # the first token ended the request (max_tokens 1, a stop token, EOS): the blocks are already
    # freed (block_ids empty, nothing to READ or release); the decode side only reports the token
    final: bool = False


@dataclass(frozen=True)
class TokenDelta:
    """New output of one request (one or more tokens), streamed decode -> router."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    # SamplingParams.prompt_logprobs, on the request's first delta (the one with its first token)
    # only; one entry per prompt token, entry 0 None (no prefix):
    #   prompt_logprobs[i]      log P(prompt[i] | prompt[:i]), the model's own fp32 log-softmax
    #   prompt_top_logprobs[i]  the k most likely tokens after prompt[:i], (token id, logprob), best
    #                           first; the whole field None when k == 0
    prompt_logprobs: tuple[float | None, ...] | None = None
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...] | None, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_deltas(deltas: list[TokenDelta]) -> TokenDelta:
    """One delta for consecutive deltas of one request (tokens, text and logprobs in order; the
    last one's finish and counts; the prompt logprobs of the one that has them, the first)."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    lps = [lp for d in deltas for lp in (d.logprobs or ())]
    tops = [t for d in deltas for t in (d.top_logprobs or ())]
    first = next((d for d in deltas if d.prompt_logprobs is not None), last)
    return TokenDelta(
        request_id=last.request_id, token_ids=tuple(t for d in deltas for t in d.token_ids),
        text="".join(d.text for d in deltas), logprobs=tuple(lps) if lps else None,
        top_logprobs=tuple(tops) if tops else None, finish_reason=last.finish_reason,
        num_prompt_tokens=last.num_prompt_tokens, num_cached_tokens=last.num_cached_tokens, error=last.error,
        prompt_logprobs=first.prompt_logprobs, prompt_top_logprobs=first.prompt_top_logprobs,
    )


class KVEventKind(str, Enum):
    STORED = "stored"  # blocks became reusable prefix-cache entries
    REMOVED = "removed"  # blocks were evicted (their hashes no longer resolve on that worker)
    CLEARED = "cleared"  # the worker dropped its whole cache (restart, resize to zero)


@dataclass(frozen=True)
class KVEvent:
    worker_id: str
    kind: KVEventKind
    block_hashes: tuple[int, ...] = ()
    seq: int = 0  # per-worker sequence number; a gap tells the router to resync that worker


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    role: Role
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_total_blocks: int
    num_pinned_blocks: int = 0  # prefill: blocks held for decode under leases
    is_draining: bool = False
    # prompt tokens still to compute: waiting requests' whole prompts (their prefix hit is known only
    # at admission: an upper bound) + the uncomputed rest of running prefills; the router's TTFT
    # estimate divides it by the worker's prefill rate (router/prefill_rates.py)
    num_pending_prefill_tokens: int = 0
    # seconds since the worker's engine thread last went round its loop (a step, a batch of
    # commands, or an idle 50 ms wait): a few ms when healthy, up to one step's length while it
    # steps slowly, growing while it is stuck; past router.engine_stall_timeout_s the router takes
    # the worker out of routing and readiness (its polls still answer: they never wait for a step)
    engine_stalled_s: float = 0.0
    engine_has_work: bool = False  # requests running, waiting or in flight in the engine


@dataclass(frozen=True)
class WorkerCounters:
    """Monotonic counters a worker reports (the router exports them as Prometheus metrics)."""

    num_requests_finished: int = 0
    num_prompt_tokens: int = 0
    num_prompt_tokens_cached: int = 0  # prefix-cache hits
    num_transfers: int = 0
    num_transfer_failures: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0
    num_local_prefills: int = 0  # conditional disaggregation: short uncached part, prefilled on decode
    num_prefill_fallbacks: int = 0  # every remote prefill attempt failed; re-run locally (never silent)
    num_prefill_retries: int = 0
    num_leases_expired: int = 0
    num_preemptions: int = 0
    num_import_waits: int = 0  # decode: imports that found too few free KV blocks and waited
    num_final_first_tokens: int = 0  # decode: a remote prefill's first token ended the request (no KV moved)


@dataclass(frozen=True)
class WorkerState:
    """A worker's answer to the router's poll: its load and the KV events since the router's
    last seen seq. When the worker's event log no longer reaches back that far,
    ``events_complete`` is False and ``cached_hashes`` is a full snapshot instead."""

    load: WorkerLoad
    events: tuple[KVEvent, ...]
    events_complete: bool
    cached_hashes: tuple[int, ...] | None
    last_seq: int  # seq of the newest event included (or of the snapshot)
    counters: "WorkerCounters"


class WorkerDrainingError(RuntimeError):
    """The worker is draining or stopping and takes no new work: route elsewhere."""


class RequestFailedError(RuntimeError):
    """A request could not be served by this worker (its prefill and transfer attempts all failed)."""


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker registers in etcd under /pdserve/<cluster>/workers/<role>/<worker_id>."""

    worker_id: str
    role: Role
    actor_name: str  # Ray named actor (namespace: the cluster name)
    address: str  # node IP
    model: str
    kv_capacity_blocks: int
    compat_hash: str
    started_at: float


# -- kv transfer --
# The handshake between transceivers travels through our own channel (a Ray call's return value),
# never through NIXL's listener (which binds every interface).
from kv_transfer.layout import KVLayout  # noqa: E402  (kept with the messages that use it)


@dataclass(frozen=True)
class KVSegmentInfo:
    """Where one KV segment tensor lives in its worker's address space (or on its GPU)."""

    index: int
    base_address: int
    num_bytes: int
    device_id: int  # CUDA ordinal; 0 for host memory


@dataclass(frozen=True)
class CudaIpcSegment:
    """A VRAM KV segment exported for CUDA IPC to readers on the same node: the fields of torch's
    ``UntypedStorage._share_cuda_()`` (legacy cudaIpcMemHandle of the allocation, torch's IPC ref
    counter and an event the reader waits on before the first use) plus where the segment sits."""

    index: int
    gpu_uuid: str  # the GPU holding it (ordinals differ between processes; UUIDs do not)
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    tensor_offset: int  # elements from the storage's start to the segment tensor


@dataclass(frozen=True)
class PeerInfo:
    """Transceiver handshake: what a peer needs to READ (or WRITE) this worker's KV blocks.
    Valid for one ``kv_epoch``: a KVHandle with a newer epoch means fetch a fresh PeerInfo."""

    worker_id: str
    backend: str  # "nixl" | "tcp": both sides must use the same
    agent_name: str  # unique per worker incarnation (a restarted worker gets a new one)
    agent_metadata: bytes  # nixl: nixl_agent.get_agent_metadata(); tcp: the token a reader presents
    memory_kind: str  # "DRAM" | "VRAM"
    segments: tuple[KVSegmentInfo, ...]
    layout: KVLayout
    compat_hash: str
    kv_epoch: int
    tcp_address: str = ""  # tcp: "host:port" of the block server; empty for nixl
    host_id: str = ""  # the node (hostname + boot id): CUDA IPC only between equal host ids
    cuda_ipc: tuple[CudaIpcSegment, ...] = ()  # VRAM segments exported for same-node readers


@dataclass(frozen=True)
class LayerwiseTarget:
    """Decode -> prefill (layer-wise streaming): where to WRITE each layer of a request's KV.
    The decode worker allocated ``block_ids`` before asking for the prefill and owns them; it frees
    them only after the prefill side finished or aborted its sender (or died)."""

    request_id: str
    worker_id: str  # the decode worker
    block_ids: tuple[int, ...]  # decode-side blocks, in prompt order (one per prefill-side block)
    kv_epoch: int  # decode's segment-set version: prefill re-handshakes when it knows an older one
    compat_hash: str
    # block_ids[i] receives the prompt's block first_block_index + i: the decode side already
    # holds blocks [0, first_block_index) of this prompt in its prefix cache
    first_block_index: int = 0


@dataclass(frozen=True)
class IngressSnapshot:
    """One OpenAI endpoint replica -> the cluster manager (Serve ``broadcast`` to every replica):
    what this replica alone counted and routed. Serve sends each GET /metrics to one replica, so
    the manager asks them all and sums (cluster/ingress_replicas.py, cluster/endpoint_counts.py)."""

    replica_id: str  # Serve's replica id: a restarted replica gets a new one
    metrics_text: str  # this replica's Prometheus exposition (what its GET /metrics answers)
    decisions: tuple[dict, ...]  # its recent routing decisions, oldest first (GET /v1/routing/recent)
    zero_overlap_alarm: bool
    num_inflight: int  # requests in flight at this replica
