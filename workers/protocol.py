"""Every message that crosses a process boundary (router <-> workers <-> transceivers), typed and
frozen. No free-form dicts cross actors.

A request's trip, in messages:

    router  --GenerateRequest-->  decode worker
    decode  --PrefillRequest-->   prefill worker   (unless it prefills locally)
    prefill --KVHandle-->         decode           (blocks pinned on prefill under a lease)
    decode  READs the blocks (kv_transfer), then --release--> prefill (frees the pinned blocks)
    decode  --TokenDelta*-->      router           (streamed)
    workers --KVEvent*-->         router           (prefix index), WorkerLoad (routing weights)

SamplingParams and its parts (structured output, reasoning markers, their limits) live in
workers/sampling_params.py and are re-exported here: every message is imported from this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from workers.sampling_params import (  # noqa: F401  (re-exported: messages are imported from here)
    MAX_LOGIT_BIAS, MAX_PRIORITY, MAX_STRUCTURED_SPEC_CHARS, MAX_TOP_LOGPROBS, MIN_PRIORITY, InvalidRequestError,
    ReasoningMarkers, SamplingParams, StructuredOutput,
)


class Role(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the client or the cluster
    ERROR = "error"  # failed; TokenDelta.error says why


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
    num_compiles_serving: int = 0  # Triton / torch.compile compiles after the worker started serving
    compile_seconds_serving: float = 0.0  # ... and their seconds: each stalled the engine that long


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
