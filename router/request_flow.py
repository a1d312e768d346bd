"""A request's whole trip, in one place:

    route (ClusterView.plan: decode worker + ranked prefill workers, or local prefill)
      -> decode worker .run (it asks a prefill worker for a KV handle, READs the blocks,
         releases the handle, then decodes; or prefills locally)
      -> its TokenDeltas come through this process's one stream from that worker (token_streams.py;
         router.token_streams: per_worker), or through a stream of their own (.generate; per_request)
      -> stream TokenDeltas back to the client

Failures (every wait is bounded):
  - the decode worker dies (RayActorError) or hangs (it left the etcd membership because its lease
    expired, or for limits.worker_stall_timeout_s it streamed nothing while it answered no poll or
    reported an engine making no progress): the request migrates. The prompt plus every token
    already streamed goes to another decode worker; seeded sampling resumes at the same output
    position and the router's own detokenizer continues the text, so the stream has no gap and no
    repeat. After limits.max_migrations: MigrationsExhausted. Prompt logprobs came with the first
    delta: a request migrated after it resumes without them (resumed_sampling); one migrated
    before it asks again, for the same prompt.
  - limits.request_timeout_s over the whole request: RequestTimedOut.
  - a worker that refuses (draining) before producing anything is simply skipped.
Leaving a worker's stream early for any reason (client gone, migration, timeout) cancels it there:
the worker aborts the request and frees its KV blocks, and those of the prefill worker it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from router.cluster_view import ClusterView
from router.config import LimitsConfig
from router.token_streams import StreamLost, token_streams
from workers.engine.detokenizer import request_detokenizer
from workers.protocol import FinishReason, GenerateRequest, SamplingParams, TokenDelta, WorkerDrainingError

log = logging.getLogger(__name__)

WORKER_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)
_CHECK_INTERVAL_S = 0.25  # how often a wait for the next token re-checks the worker and the deadline
# The router owns the request deadline (RequestTimedOut, then it cancels the worker's stream); the
# worker's own deadline is this much later, a backstop for a router that went away.
_WORKER_DEADLINE_GRACE_S = 2.0


class MigrationsExhausted(RuntimeError):
    pass


class RequestTimedOut(RuntimeError):
    pass


class WorkerStalled(RuntimeError):
    """The decode worker left the membership or went silent: treated like a dead one."""


async def serve_request(view: ClusterView, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                        cache_salt: str | None, limits: LimitsConfig, tokenizer=None,
                        on_event=None) -> AsyncIterator[TokenDelta]:
    """Yields the request's TokenDeltas; the last one has finish_reason set."""
    generated: list[int] = []
    sent_prompt_logprobs = False
    exclude: set[str] = set()
    text: _ResumedText | None = None  # set at the first migration that had produced tokens
    migrations = 0
    deadline = time.monotonic() + limits.request_timeout_s
    while True:
        if time.monotonic() >= deadline:
            raise RequestTimedOut("the request did not finish by its deadline (limits.request_timeout_s)")
        attempt_id = request_id if not exclude else f"{request_id}#{len(exclude)}"
        remaining = resumed_sampling(sampling, len(generated), sent_prompt_logprobs)
        plan, prefill_ranked = view.plan(prompt_token_ids + generated, cache_salt, attempt_id, frozenset(exclude),
                                         prompt_logprobs=remaining.prompt_logprobs is not None)
        decode_id = plan.decode.worker_id
        try:  # until the source exists, an error here ends the attempt: its prefill no longer counts
            req = GenerateRequest(attempt_id, tuple(prompt_token_ids + generated), remaining, cache_salt,
                                  prefill_ranked, deadline_s=deadline - time.monotonic() + _WORKER_DEADLINE_GRACE_S,
                                  prefill_timeout_s=limits.prefill_timeout_s,
                                  stream_interval=_stream_interval(view.config.stream_interval_tokens))
            if on_event:
                on_event("routed", plan)
            if view.config.token_streams == "per_worker":
                source = token_streams(view).open(decode_id, attempt_id)  # registered before run() starts
                req = dataclasses.replace(req, subscriber_id=source.subscriber_id)
                source.start(view.actor(decode_id).run.remote(req))
            else:
                source = _RequestStream(view.actor(decode_id).generate.options(num_returns="streaming").remote(req))
        except BaseException:
            view.prefill_done(attempt_id)
            raise
        view.note_routed(decode_id, +1)
        produced, worker_done = False, False
        try:
            async with contextlib.aclosing(_watched(source, view, decode_id, deadline,
                                                    limits.worker_stall_timeout_s)) as deltas:
                async for delta in deltas:
                    if not produced and delta.token_ids:
                        view.prefill_done(attempt_id)  # the first token: its prefill is over
                    produced = produced or bool(delta.token_ids)
                    sent_prompt_logprobs = sent_prompt_logprobs or delta.prompt_logprobs is not None
                    worker_done = delta.finished
                    generated += delta.token_ids
                    if exclude:
                        delta = dataclasses.replace(delta, request_id=request_id,
                                                    num_prompt_tokens=len(prompt_token_ids))
                    if text is not None:
                        delta = text.rewrite(delta)
                    yield delta
                    if delta.finished:
                        return
            raise RayActorError(f"decode worker {decode_id} ended the stream without finishing the request")
        except WorkerDrainingError:
            if produced:
                raise
            exclude.add(decode_id)  # it refused before doing anything: try another worker
        except (*WORKER_GONE, WorkerStalled, StreamLost) as e:
            exclude.add(decode_id)
            migrations += 1
            if on_event:
                on_event("migrated", decode_id)
            if migrations > limits.max_migrations:
                raise MigrationsExhausted(
                    f"request {request_id}: decode workers failed {migrations} times "
                    f"(limits.max_migrations = {limits.max_migrations}); giving up. Last: {e}") from e
            log.warning("decode worker %s failed during request %s after %d tokens (%s); migrating", decode_id,
                        request_id, len(generated), e)
            if generated and text is None and tokenizer is not None:
                text = _ResumedText(tokenizer, prompt_token_ids, sampling, generated)
        finally:
            view.note_routed(decode_id, -1)
            view.prefill_done(attempt_id)
            # cancelled unless it finished: the worker aborts and frees KV on every worker it involved
            source.close(cancel=not worker_done)


def resumed_sampling(sampling: SamplingParams, num_generated: int, sent_prompt_logprobs: bool) -> SamplingParams:
    """An attempt's sampling: a resumed request has [prompt | generated so far] as its prompt and
    produces the rest (seeded draws continue at their output positions); once the client has the
    prompt logprobs, none are asked again (that prompt holds generated tokens too)."""
    return dataclasses.replace(sampling, max_tokens=sampling.max_tokens - num_generated,
                               output_position_offset=sampling.output_position_offset + num_generated,
                               prompt_logprobs=None if sent_prompt_logprobs else sampling.prompt_logprobs)


def _stream_interval(setting: int | str) -> int:
    return 0 if setting == "auto" else int(setting)  # 0: the decode worker decides


async def _watched(source, view: ClusterView, worker_id: str, deadline: float,
                   stall_timeout_s: float) -> AsyncIterator[TokenDelta]:
    """The worker's TokenDeltas (source: a _RequestStream or token_streams.RequestTokens). Raises
    WorkerStalled when the worker left the membership, or sent nothing (on this request's stream or
    on the shared one) and showed no progress (ClusterView.silence_s: no poll answered, or an engine
    stuck) for stall_timeout_s; RequestTimedOut past the deadline."""
    last_heard = time.monotonic()
    while True:
        nxt = asyncio.ensure_future(source.next())
        try:
            while not nxt.done():
                now = time.monotonic()
                if now >= deadline:
                    raise RequestTimedOut("the request did not finish by its deadline (limits.request_timeout_s)")
                silence_s = view.silence_s(worker_id)
                if silence_s is None:
                    raise WorkerStalled(f"decode worker {worker_id} left the cluster (etcd lease expired or "
                                        f"deregistered)")
                if min(silence_s, now - max(last_heard, source.heard_at())) > stall_timeout_s:
                    raise WorkerStalled(f"decode worker {worker_id} sent nothing and showed no progress (no poll "
                                        f"answered, or its engine stuck) for {stall_timeout_s:.0f} s "
                                        f"(limits.worker_stall_timeout_s)")
                await asyncio.wait({nxt}, timeout=min(_CHECK_INTERVAL_S, deadline - now))
        except BaseException:
            nxt.cancel()
            raise
        try:
            delta = nxt.result()
        except StopAsyncIteration:
            return
        last_heard = time.monotonic()
        yield delta


class _RequestStream:
    """router.token_streams: per_request: the request's own Ray stream from DecodeWorker.generate."""

    def __init__(self, stream):
        self.stream = stream

    async def next(self) -> TokenDelta:  # StopAsyncIteration at the stream's end
        ref = await self.stream.__anext__()
        return await ref

    def heard_at(self) -> float:
        return 0.0  # nothing but this request's own deltas

    def close(self, cancel: bool) -> None:
        if not cancel:
            return
        try:
            ray.cancel(self.stream)
        except Exception as e:  # e.g. the actor is already gone: nothing left to cancel
            log.debug("cancelling a decode stream failed: %r", e)


class _ResumedText:
    """The text of a migrated request, continued by the router.

    The failed worker's detokenizer may have held text back (an unfinished UTF-8 character, a
    possible stop-string prefix); the new worker starts its own after the tokens it was given, so
    that text would be lost. Instead this detokenizer replays every token so far (same algorithm,
    one token at a time like the engine, so it reaches the failed worker's exact state: what it
    had emitted is what the client has) and from then on produces the text of each delta, stop
    strings included. A stop string found here ends the request (the worker's stream is cancelled).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], sampling: SamplingParams, generated: list[int]):
        self.detok = request_detokenizer(tokenizer, sampling, prompt_token_ids)
        for t in generated:
            self.detok.add([t])
        self.detok.take_delta(final=False)  # == the text the client already has

    def rewrite(self, delta: TokenDelta) -> TokenDelta:
        ids = list(delta.token_ids)
        kept = 0
        for t in ids:
            if self.detok.stopped:
                break
            self.detok.add([t])
            kept += 1
        if self.detok.stopped:
            return dataclasses.replace(delta, token_ids=tuple(ids[:kept]), text=self.detok.take_delta(final=True),
                                       logprobs=delta.logprobs[:kept] if delta.logprobs else delta.logprobs,
                                       top_logprobs=delta.top_logprobs[:kept] if delta.top_logprobs else None,
                                       finish_reason=FinishReason.STOP)
        return dataclasses.replace(delta, text=self.detok.take_delta(final=delta.finished))


def error_delta(request_id: str, message: str) -> TokenDelta:
    return TokenDelta(request_id, (), "", finish_reason=FinishReason.ERROR, error=message)
