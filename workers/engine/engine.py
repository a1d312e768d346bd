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

Prompt logprobs (SamplingParams.prompt_logprobs, workers/engine/prompt_logprobs.py): such a request
computes its whole prompt where it is prefilled (no prefix-cache hit), every step carrying its
prompt chunks runs eagerly with the final hidden states kept (ModelRunner.execute_with_hidden), and
its first token's delta carries them (prefill-only: its KVHandle, which the import hands on).

Async scheduling (EngineConfig.async_scheduling): step() launches step n+1 before it reads step
n's sampled tokens back, so the host's work overlaps the GPU's; a request's newest token may be
*pending* (sampled on the device, unknown to the host) while its next step is already queued.
Outputs then come one step() later; has_work() stays true while a step is in flight. Penalties
count a pending token too: their token counts live on the device (penalties.py).
"""

from __future__ import annotations

import logging

from kv_transfer.layout import KVLayout, dtype_name
from workers.engine.attention import TokenFill
from workers.engine.block_pool import BlockPool, NoFreeBlocks
from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.device_transfer import DeviceMark
from workers.engine.kv_cache import KVCache
from workers.engine.launched_step import LaunchedStep, LaunchedSteps
from workers.engine.layer_hooks import LayerHookFactory, LayerHooks, make_layer_hook
from workers.engine.model_runner import ModelRunner
from workers.engine.outputs import EngineStats, ImportReservation, StepOutput
from workers.engine.penalties import TokenCounts
from workers.engine.prompt_logprobs import score_rows
from workers.engine.request import Request, RequestStatus, check_new_request
from workers.engine.resizer import SegmentResizer
from workers.engine.sampler import Sampler
from workers.engine.scheduler import Scheduler
from workers.engine.split_points import SplitPoints
from workers.engine.sampling_constraints import allowed_masks, min_tokens_bans
from workers.engine.step_inputs import StepInputs
from workers.engine.structured_output import GrammarState, Grammars, token_bitmask
from workers.engine.token_outcome import append_token, next_is_last_by_length, token_delta
from workers.engine.warm_up import warm_up
from workers.protocol import FinishReason, InvalidRequestError, KVEvent, SamplingParams, TokenDelta

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "ImportReservation", "NoFreeBlocks", "StepOutput"]


class Engine(SplitPoints):
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
        # blocks freed while a queued step may still write them are remembered (see reserve_import)
        self.scheduler.on_free = lambda req: self._launched.released(req, req.block_ids)
        self.runner.bind_kv_cache(self.kv_cache, engine_config.attention_backend)
        self.sampler = Sampler(self.runner.device)
        # may be changed between steps (benchmarks compare both on one engine)
        self.async_scheduling = (self.runner.device.type == "cuda" if engine_config.async_scheduling == "auto"
                                 else bool(engine_config.async_scheduling))
        self._in_flight: LaunchedStep | None = None  # launched by the last step(), not yet resolved
        self._launched = LaunchedSteps()
        self.num_overlapped_steps = 0  # steps left in flight by step() (async scheduling)
        self.num_dropped_tokens = 0  # sampled for requests that had stopped or were aborted meanwhile
        self.requests: dict[str, Request] = {}
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.hf_config.get_text_config().vocab_size
        self.token_counts = TokenCounts(self.vocab_size, self.runner.device)  # penalised requests only
        # structured output: compiled at the first such request (needs the tokenizer)
        self.grammars = (Grammars(self.tokenizer, self.vocab_size, self.runner.eos_token_ids)
                         if self.tokenizer is not None else None)
        self.num_warm_up_steps = warm_up(self)

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
        self.scheduler.withdraw_import(request_id)
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if req.status in (RequestStatus.PINNED, RequestStatus.RESERVED):
            self.scheduler.free_blocks(req)
        else:
            self.scheduler.remove(req)  # a token it has pending is dropped when its step is resolved
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.ABORT
        return True

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._in_flight)

    # -- the step ------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        """Schedule and launch one step, and return the outputs of the step(s) resolved meanwhile.

        Synchronous: the step is launched and resolved (tokens read back) before returning.
        Async scheduling: the step stays in flight; the next call schedules and launches the
        following one first (a pending token is fed to it on the device) and only then resolves
        this one. Deterministic exceptions, resolved before returning so their outputs come from
        this very call: a step that samples a prefill-only request (its KV handle is read by
        peers at once) or runs layer hooks (layer-wise export). Requests that finish by length
        leave the scheduler before the next step is scheduled (their last token is known to be
        last before it is read); a request that stops on a token or string still takes a slot
        in the step launched before that token is read: that slot's token is dropped and its
        blocks are freed when the stop is seen."""
        out = StepOutput([], [])
        prev, self._in_flight = self._in_flight, None
        self.reap_retired_segments()
        if prev is not None:
            self._retire_length_finished(prev)
        batch = self.scheduler.schedule()
        launched = self._launch(batch, prev, out) if batch.requests else None
        if prev is not None and not prev.resolved:
            self._resolve(prev, out)
        for req in batch.capacity_exhausted:
            if req.status == RequestStatus.FINISHED:
                continue  # its pending token (just read) finished it
            self.requests.pop(req.request_id, None)
            self.scheduler.free_blocks(req)
            req.status = RequestStatus.FINISHED
            out.deltas.append(token_delta(req, (), None, None, FinishReason.LENGTH,
                                          error="request needs more KV blocks than this worker has"))
        if launched is not None and launched.sample is not None:
            if self.async_scheduling and not launched.resolve_now:
                self._in_flight = launched
                self.num_overlapped_steps += 1
            else:
                self._resolve(launched, out)
        return out

    def _launch(self, batch, prev: LaunchedStep | None, out: StepOutput) -> LaunchedStep:
        """Stage the batch, queue its forward pass and sampling; no host sync, except where a
        grammar's mask needs a token of ``prev`` (in flight): prev is resolved into ``out`` after
        the forward pass is queued, so the device runs it while the host reads prev's tokens,
        advances the grammars and fills their masks; only the sampling waits for those."""
        inputs = StepInputs.pack(batch.requests, batch.num_new_tokens)
        sampled = inputs.sampled
        hooks = [h for req in sampled if req.layer_hook_factory is not None for h in make_layer_hook(req)]
        fill = None
        if inputs.fill_rows:
            if prev is None:
                raise RuntimeError("internal: a pending token without a step in flight")
            fill = TokenFill(tuple(inputs.fill_rows), tuple(inputs.fill_index), prev.sample.token_ids)
        on_layer = LayerHooks(hooks) if hooks else None
        logits_indices = inputs.logits_indices or [len(inputs.input_ids) - 1]
        if inputs.prompt_rows:
            logits, hidden = self.runner.execute_with_hidden(inputs.input_ids, inputs.positions, inputs.seqs,
                                                             logits_indices, inputs.prompt_rows, on_layer, fill)
            self._score_prompt_rows(inputs, hidden)
        else:
            logits = self.runner.execute(inputs.input_ids, inputs.positions, inputs.seqs, logits_indices, on_layer,
                                         fill)
        bs = self.block_size
        for req, n in zip(batch.requests, batch.num_new_tokens):
            c = req.num_computed_tokens = req.num_computed_tokens + n
            if (c if c < req.num_tokens else req.num_tokens) // bs > req.num_hashed_blocks:
                self._publish_blocks(req)  # a block just filled (see _publish_blocks)
        # the step is known as launched before prev may be resolved below: blocks that prev's
        # tokens free (a stop) are still written by this step's forward (LaunchedSteps.released)
        step = LaunchedStep(set(batch.requests), sampled, None, None,
                            resolve_now=bool(hooks) or any(r.prefill_only for r in sampled))
        self._launched.add(step)  # its mark is set below: nothing waits on it before
        if sampled:
            if prev is not None and any(r.grammar is not None and r.num_pending for r in sampled):
                self._resolve(prev, out)  # the grammars take prev's tokens; this forward runs meanwhile
            # the output index of the token sampled now counts a pending one (seeded sampling); so
            # do the penalties' token counts, kept on the device (workers/engine/penalties.py)
            positions = [len(r.output_token_ids) + r.num_pending for r in sampled]
            sample = self.sampler.sample(
                logits, [r.sampling for r in sampled], positions, self.token_counts.rows(sampled),
                min_tokens_bans(sampled, positions, self.runner.eos_token_ids, self.vocab_size),
                allowed_masks(sampled, self.vocab_size, pin=self.runner.device.type == "cuda"),
                self.runner.greedy_ids(logits))
            step.sample, step.mark = sample, sample.mark
        else:
            step.mark = DeviceMark(self.runner.device)
        for i, req in enumerate(sampled):
            req.num_pending += 1
            req.pending_row = i
        return step

    def _score_prompt_rows(self, inputs: StepInputs, hidden) -> None:
        """Queue the prompt logprobs of the step's prompt rows (hidden: their final hidden states)
        and each chunk's copy to the host; read with the request's first token."""
        k = max(req.prompt_logprobs.k for req, _, _ in inputs.prompt_chunks)
        scored = score_rows(self.runner.head, hidden, inputs.prompt_targets, k)
        row = 0
        for req, start, num_rows in inputs.prompt_chunks:
            req.prompt_logprobs.add(start, scored[row:row + num_rows])
            row += num_rows

    def _resolve(self, step: LaunchedStep, out: StepOutput) -> None:
        """Read the step's tokens back (the step's one device->host sync) and apply them."""
        step.resolved = True
        res = step.sample.result()
        self._launched.synced(step)
        token_ids, logprobs, tops = res.token_ids, res.logprobs, res.top_logprobs
        deltas, bs, finished = out.deltas, self.block_size, RequestStatus.FINISHED
        for i, req in enumerate(step.sampled):
            req.num_pending -= 1
            if req.status == finished:
                self.num_dropped_tokens += 1  # aborted, or stopped by its previous token: dropped
                continue
            lp = logprobs[i] if logprobs else None
            top = tops[i] if tops else None
            if req.layer_hook_error is not None:
                deltas.append(self._fail(req, req.layer_hook_error))
            elif req.prefill_only:
                out.handles.append(self._pin(req, token_ids[i], lp, top))
            else:
                delta = self._append_token(req, token_ids[i], lp, top)
                deltas.append(delta)
                if delta.finish_reason is None:
                    if req.retired:
                        raise RuntimeError(f"internal: {req.request_id} was retired but did not finish")
                    if min(req.num_computed_tokens, req.num_tokens) // bs > req.num_hashed_blocks:
                        self._publish_blocks(req)  # blocks completed by the token just read

    def _retire_length_finished(self, prev: LaunchedStep) -> None:
        """Requests whose pending token is their last by length (max_tokens, context) leave the
        scheduler now, exactly when the synchronous path would drop them: they take no slot in
        the next step and their blocks are free for it (the device runs it after prev, in order).
        Their token is emitted when prev is resolved."""
        finished = RequestStatus.FINISHED
        for req in prev.sampled:
            if req.num_pending != 1 or req.status == finished or req.prefill_only:
                continue
            if next_is_last_by_length(req, self.max_model_len):
                self._publish_blocks(req)
                self.scheduler.remove(req)
                req.retired = True

    # -- KV quota ------------------------------------------------------------------------------
    def reap_retired_segments(self) -> bool:
        """Return the memory of shrunk-away segments whose last block is free now; True if any
        went. step() does it first; an idle engine's owner calls it too (EngineLoop), since the
        blocks freed by the last step or by a command (a released KV handle) would otherwise keep
        their segment until the next request."""
        return self.resizer.reap(before_free=self._launched.wait_all)  # a queued step may still write a segment

    def resize(self, num_blocks: int):
        """Set the KV quota (rounded up to whole segments). Growing is immediate; shrinking evicts
        free cached blocks, never touches a block in use, and finishes as in-use blocks free up.
        Queued steps are waited for before a segment's memory goes (they may still write it)."""
        return self.resizer.resize(num_blocks, before_free=self._launched.wait_all)

    # -- observability -------------------------------------------------------------------------
    def take_kv_events(self) -> list[KVEvent]:
        return self.pool.take_events()

    def stats(self) -> EngineStats:
        pinned = [r for r in self.requests.values() if r.status == RequestStatus.PINNED]
        sch = self.scheduler
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
            num_pending_prefill_tokens=sum(r.num_tokens - r.num_computed_tokens for q in (sch.running, sch.waiting)
                                           for r in q if r.is_prefilling),
            num_waiting_imports=len(sch.waiting_imports()), num_import_waits=sch.num_import_waits,
        )

    # -- internals -----------------------------------------------------------------------------
    def _new_request(self, request_id, prompt_token_ids, sampling, cache_salt, prefill_only) -> Request:
        if request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        prompt = check_new_request(prompt_token_ids, sampling, has_tokenizer=self.tokenizer is not None,
                                   vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                                   block_size=self.block_size, num_blocks=self.kv_cache.num_blocks)
        if sampling.prompt_logprobs is not None and self.runner.prompt_logprobs_unsupported:
            raise InvalidRequestError(f"prompt_logprobs is not supported here: "
                                      f"{self.runner.prompt_logprobs_unsupported}", "prompt_logprobs")
        req = Request(request_id, prompt, sampling, self.block_size, cache_salt, prefill_only)
        if sampling.allowed_token_ids:
            if max(sampling.allowed_token_ids) >= self.vocab_size:
                raise InvalidRequestError(f"allowed_token_ids must be in [0, {self.vocab_size})", "allowed_token_ids")
            req.allowed_mask = token_bitmask(sampling.allowed_token_ids, self.vocab_size)
        if sampling.structured is not None:
            if self.grammars is None:
                raise InvalidRequestError("structured output needs a tokenizer; this model has none",
                                          sampling.structured.param)
            # a resumed request (migration, import) replays the output it already has (the prompt's tail)
            offset = sampling.output_position_offset
            req.grammar = GrammarState(self.grammars.matcher(sampling.structured), sampling.reasoning).resume(
                prompt[len(prompt) - offset:] if offset else (), sampling.structured.param)
        return req

    def _publish_blocks(self, req: Request) -> None:
        """Put the request's newly completed full blocks into the prefix cache: those whose KV is
        computed (queued) AND whose token ids are known (a pending token's id is not: its block
        is published once the token is read, so the hash chain is always the real one)."""
        full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        if full <= req.num_hashed_blocks:
            return
        hashes = req.block_hashes()
        for j in range(req.num_hashed_blocks, full):
            self.pool.cache_block(req.block_ids[j], hashes[j])
        req.num_hashed_blocks = full

    def _fail(self, req: Request, error: str) -> TokenDelta:
        self.requests.pop(req.request_id, None)
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.ERROR
        return token_delta(req, (), None, None, FinishReason.ERROR, error=error)

    def _append_token(self, req: Request, token_id: int, logprob, top) -> TokenDelta:
        if req.grammar is not None and not req.grammar.accept_token(token_id):
            # sampled under its mask: only if that was empty
            return self._fail(req, "its grammar and allowed_token_ids leave no token to sample"
                              if req.allowed_mask is not None else
                              f"internal: token {token_id} does not follow the request's grammar")
        finish = append_token(req, token_id, logprob, self.tokenizer, self.runner.eos_token_ids, self.max_model_len)
        if finish is not None:
            self.requests.pop(req.request_id, None)
            self.scheduler.remove(req)
            req.status = RequestStatus.FINISHED
            req.finish_reason = finish
        return token_delta(req, (token_id,), logprob, top, finish)
