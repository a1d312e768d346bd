"""The engine: paged KV cache + continuous batching + prefix caching over a transformers model.

Single-threaded: one owner calls every method (a worker's engine thread). Three ways in:

    add_request(...)                      colocated: prefill + decode here
    add_request(..., prefill_only=True)   prefill side: the step that finishes the prompt samples the
                                          first token and returns a KVHandle; blocks stay pinned
                                          until release_handle() (exactly one release per handle)
    add_request(..., on_layer_done=f)     layer-wise export: f(block_ids) is called when the prompt's
                                          last chunk is scheduled and returns hook(layer, wait_written),
                                          called after that step wrote layer L of its KV. Earlier chunks
                                          wrote every layer of their blocks, so after hook(L) layer L of
                                          ALL block_ids is complete (once wait_written() returns)
    reserve_import(...) -> block ids      decode side: blocks for a prompt whose KV will arrive from
    commit_import(...)                    elsewhere; commit once the bytes are in, then it decodes here

The engine never moves KV between processes; kv_transfer/ does, addressing blocks by id.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kv_transfer.layout import KVLayout, dtype_name
from workers.engine.attention import SeqSlice
from workers.engine.block_pool import BlockPool, NoFreeBlocks
from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.detokenizer import Detokenizer
from workers.engine.kv_cache import KVCache
from workers.engine.layer_hooks import LayerHookFactory, LayerHooks, make_layer_hook
from workers.engine.model_runner import ModelRunner
from workers.engine.request import Request, RequestStatus
from workers.engine.resizer import SegmentResizer
from workers.engine.sampler import Sampler
from workers.engine.scheduler import Scheduler
from workers.protocol import FinishReason, InvalidRequestError, KVEvent, KVHandle, SamplingParams, TokenDelta

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "ImportReservation", "NoFreeBlocks", "StepOutput"]


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


class Engine:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, model_path: str,
                 worker_id: str = "engine"):
        self.config = engine_config
        self.worker_id = worker_id
        self.runner = ModelRunner(model_config, engine_config, model_path)
        self.tokenizer = self.runner.tokenizer
        self.block_size = engine_config.block_size
        self.layout = KVLayout(
            model_id=self.runner.model_id,
            num_layers=self.runner.num_layers,
            num_kv_heads=self.runner.num_kv_heads,
            head_dim=self.runner.head_dim,
            block_size=engine_config.block_size,
            dtype=dtype_name(self.runner.dtype),
            blocks_per_segment=engine_config.blocks_per_segment,
        )
        num_segments = -(-engine_config.num_kv_blocks // engine_config.blocks_per_segment)
        self.kv_cache = KVCache(self.layout, num_segments, self.runner.device)
        self.pool = BlockPool(worker_id, engine_config.enable_prefix_caching)
        for index in sorted(self.kv_cache.segments):
            self.pool.add_blocks(self.kv_cache.block_ids_of(index))
        self.resizer = SegmentResizer(self.kv_cache, self.pool)
        self.scheduler = Scheduler(engine_config, self.pool, self.block_size)
        self.scheduler.blocks_held_elsewhere = self._num_held_blocks
        self.runner.bind_kv_cache(self.kv_cache, engine_config.attention_backend)
        self.sampler = Sampler(self.runner.device)
        self.requests: dict[str, Request] = {}
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.hf_config.get_text_config().vocab_size

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    cache_salt: str | None = None, prefill_only: bool = False,
                    on_layer_done: LayerHookFactory | None = None) -> None:
        """on_layer_done: see the module docstring. It runs on the engine thread, inside the step,
        and must not block; if it (or its hook) raises, the request finishes with an error."""
        req = self._new_request(request_id, prompt_token_ids, sampling, cache_salt, prefill_only)
        req.layer_hook_factory = on_layer_done
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if unknown (already done)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req.status in (RequestStatus.PINNED, RequestStatus.RESERVED):
            self.scheduler.free_blocks(req)
        else:
            self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.ABORT
        return True

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # -- disaggregation split points -----------------------------------------------------------
    def release_handle(self, request_id: str) -> bool:
        """Free a prefill-only request's pinned blocks. False if it is not pinned (unknown/freed)."""
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.PINNED:
            return False
        del self.requests[request_id]
        self.scheduler.free_blocks(req)
        req.status = RequestStatus.FINISHED
        return True

    def num_cached_prompt_tokens(self, prompt_token_ids: list[int], cache_salt: str | None = None) -> int:
        """Tokens of this prompt whose KV is already cached here (full blocks)."""
        from workers.block_hash import block_hashes

        return len(self.pool.lookup(block_hashes(prompt_token_ids, self.block_size, cache_salt))) * self.block_size

    def reserve_import(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       cache_salt: str | None = None) -> ImportReservation:
        """Allocate blocks for a prompt whose KV will be written into them from elsewhere.
        Raises NoFreeBlocks when they are not free right now (nothing is held then)."""
        req = self._new_request(request_id, prompt_token_ids, sampling, cache_salt, prefill_only=False)
        n = req.num_prompt_tokens
        hits = self.pool.lookup(req.block_hashes())[: n // self.block_size] if self.config.enable_prefix_caching else []
        need = -(-n // self.block_size) - len(hits)
        if need > self.pool.num_free - sum(1 for b in hits if self.pool.ref_count[b] == 0):
            raise NoFreeBlocks(f"{need} blocks needed for an import, {self.pool.num_free} free")
        self.pool.touch(hits)
        req.block_ids = hits + self.pool.allocate(need)
        req.num_hashed_blocks = len(hits)
        req.num_cached_tokens = len(hits) * self.block_size
        req.status = RequestStatus.RESERVED
        self.requests[request_id] = req
        return ImportReservation(request_id, tuple(req.block_ids), len(hits))

    def detach_import(self, request_id: str) -> str:
        """Keep a reservation's blocks but free its request id (for a retry under the same id):
        a peer may still WRITE into the blocks, so they stay allocated until abort(returned key)."""
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.RESERVED:
            raise KeyError(f"no reserved import for request {request_id!r}")
        key = f"{request_id}/detached-{id(req):x}"
        del self.requests[request_id]
        req.request_id = key
        self.requests[key] = req
        return key

    def commit_import(self, request_id: str, first_token_id: int, first_logprob: float | None = None,
                      first_top_logprobs=None, num_cached_tokens: int | None = None) -> TokenDelta:
        """The reserved blocks now hold the prompt's KV: continue from the first sampled token."""
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.RESERVED:
            raise KeyError(f"no reserved import for request {request_id!r}")
        req.num_computed_tokens = req.num_prompt_tokens
        if num_cached_tokens is not None:
            req.num_cached_tokens = max(req.num_cached_tokens, num_cached_tokens)
        self._publish_blocks(req)
        self.scheduler.add_running(req)
        return self._append_token(req, first_token_id, first_logprob, first_top_logprobs)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        out = StepOutput([], [])
        self.resizer.reap()
        batch = self.scheduler.schedule()
        for req in batch.capacity_exhausted:
            self.requests.pop(req.request_id, None)
            req.status = RequestStatus.FINISHED
            out.deltas.append(self._delta(req, [], None, None, FinishReason.LENGTH,
                                          error="request needs more KV blocks than this worker has"))
        if not batch.requests:
            return out
        input_ids, positions, seqs, logits_idx, sampled, hooks = [], [], [], [], [], []
        for req, n in zip(batch.requests, batch.num_new_tokens):
            c = req.num_computed_tokens
            q_start = len(input_ids)
            input_ids += req.token_ids(c, c + n)
            positions += range(c, c + n)
            seqs.append(SeqSlice(q_start, n, c + n, tuple(req.block_ids)))
            if c + n == req.num_tokens:
                logits_idx.append(q_start + n - 1)
                sampled.append(req)
                if req.layer_hook_factory is not None:
                    hooks += make_layer_hook(req)
        on_layer = LayerHooks(hooks) if hooks else None
        logits = self.runner.execute(input_ids, positions, seqs, logits_idx, on_layer) if sampled else None
        if not sampled:
            self.runner.execute(input_ids, positions, seqs, [len(input_ids) - 1])
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed_tokens += n
            self._publish_blocks(req)
        if sampled:
            res = self.sampler(logits, [r.sampling for r in sampled], [len(r.output_token_ids) for r in sampled])
            for i, req in enumerate(sampled):
                lp = res.logprobs[i] if res.logprobs else None
                top = res.top_logprobs[i] if res.top_logprobs else None
                if req.layer_hook_error is not None:
                    out.deltas.append(self._fail(req, req.layer_hook_error))
                elif req.prefill_only:
                    out.handles.append(self._pin(req, res.token_ids[i], lp, top))
                else:
                    out.deltas.append(self._append_token(req, res.token_ids[i], lp, top))
        return out

    # -- KV quota ------------------------------------------------------------------------------
    def resize(self, num_blocks: int):
        """Set the KV quota (rounded up to whole segments). Growing is immediate; shrinking evicts
        free cached blocks, never touches a block in use, and finishes as in-use blocks free up."""
        return self.resizer.resize(num_blocks)

    # -- observability -------------------------------------------------------------------------
    def take_kv_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def stats(self) -> EngineStats:
        pinned = [r for r in self.requests.values() if r.status == RequestStatus.PINNED]
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_pinned=len(pinned),
            num_reserved=sum(1 for r in self.requests.values() if r.status == RequestStatus.RESERVED),
            num_used_blocks=self.pool.num_used,
            num_free_blocks=self.pool.num_free,
            num_cached_free_blocks=self.pool.num_cached_free,
            num_total_blocks=self.kv_cache.num_blocks,
            num_target_blocks=self.resizer.target_blocks,
            num_pinned_blocks=sum(len(r.block_ids) for r in pinned),
            num_preemptions=self.scheduler.num_preemptions,
            num_evictions=self.pool.num_evictions,
            prompt_tokens_queried=self.scheduler.num_prompt_tokens_queried,
            prompt_tokens_hit=self.scheduler.num_prompt_tokens_hit,
            kv_bytes=self.kv_cache.num_bytes,
        )

    # -- internals -----------------------------------------------------------------------------
    def _new_request(self, request_id, prompt_token_ids, sampling, cache_salt, prefill_only) -> Request:
        if request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        if not isinstance(sampling, SamplingParams):
            raise InvalidRequestError("sampling must be a SamplingParams")
        sampling.validate()
        if sampling.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none (use stop_token_ids)", "stop")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if any(not isinstance(t, int) or t < 0 or t >= self.vocab_size for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})", "prompt")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt)} tokens; this model's context is {self.max_model_len} tokens "
                f"(prompt + at least 1 generated token)", "prompt")
        if -(-(len(prompt) + 1) // self.block_size) > self.kv_cache.num_blocks:
            raise InvalidRequestError(
                f"the prompt needs more KV blocks than this worker has ({self.kv_cache.num_blocks} x "
                f"{self.block_size} tokens)", "prompt")
        return Request(request_id, prompt, sampling, self.block_size, cache_salt, prefill_only)

    def _num_held_blocks(self) -> int:
        return sum(len(r.block_ids) for r in self.requests.values()
                   if r.status in (RequestStatus.PINNED, RequestStatus.RESERVED))

    def _publish_blocks(self, req: Request) -> None:
        """Put the request's newly completed full blocks into the prefix cache."""
        full = req.num_computed_tokens // self.block_size
        if full <= req.num_hashed_blocks:
            return
        hashes = req.block_hashes()
        for j in range(req.num_hashed_blocks, full):
            self.pool.cache_block(req.block_ids[j], hashes[j])
        req.num_hashed_blocks = full

    def _pin(self, req: Request, token_id: int, logprob, top) -> KVHandle:
        self.scheduler.running.remove(req)
        req.status = RequestStatus.PINNED
        now = time.time()
        return KVHandle(
            request_id=req.request_id, worker_id=self.worker_id, block_ids=tuple(req.block_ids),
            num_tokens=req.num_prompt_tokens, first_token_id=token_id, first_logprob=logprob,
            first_top_logprobs=tuple(top) if top else None, compat_hash=self.layout.compat_hash(),
            kv_epoch=self.kv_cache.epoch, lease_ttl_s=0.0, expires_at=now,
            num_cached_tokens=req.num_cached_tokens,
        )

    def _fail(self, req: Request, error: str) -> TokenDelta:
        self.requests.pop(req.request_id, None)
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.ERROR
        return self._delta(req, [], None, None, FinishReason.ERROR, error=error)

    def _append_token(self, req: Request, token_id: int, logprob, top) -> TokenDelta:
        req.output_token_ids.append(token_id)
        sp = req.sampling
        if req.detok is None and self.tokenizer is not None:
            req.detok = Detokenizer(self.tokenizer, sp.stop, req.prompt_token_ids[-6:])
        finish = None
        if token_id in sp.stop_token_ids or (not sp.ignore_eos and token_id in self.runner.eos_token_ids):
            finish = FinishReason.STOP
        elif req.detok is not None:
            req.detok.add([token_id])
            if req.detok.stopped:
                finish = FinishReason.STOP
        if finish is None and (len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= self.max_model_len):
            finish = FinishReason.LENGTH
        if logprob is not None:
            req.logprobs.append(logprob)
        if finish is not None:
            self.requests.pop(req.request_id, None)
            self.scheduler.remove(req)
            req.status = RequestStatus.FINISHED
            req.finish_reason = finish
        return self._delta(req, [token_id], logprob, top, finish)

    def _delta(self, req: Request, token_ids, logprob, top, finish, error=None) -> TokenDelta:
        text = req.detok.take_delta(final=finish is not None) if req.detok else ""
        want_lp = req.sampling.logprobs or req.sampling.top_logprobs
        return TokenDelta(
            request_id=req.request_id, token_ids=tuple(token_ids), text=text,
            logprobs=(logprob,) if want_lp and logprob is not None else None,
            top_logprobs=(tuple(top),) if top else None, finish_reason=finish,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens, error=error,
        )

