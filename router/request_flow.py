"""A request's whole trip, in one place:

    route (ClusterView.plan: decode worker + ranked prefill workers, or local prefill)
      -> decode worker .generate (it asks a prefill worker for a KV handle, READs the blocks,
         releases the handle, then decodes; or prefills locally)
      -> stream TokenDeltas back to the client

If the decode worker dies mid-stream, the request migrates: the prompt plus every token already
streamed goes to another decode worker and the stream continues with no gap and no repeat.
A worker that refuses (draining) before producing anything is simply skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from router.cluster_view import ClusterView
from workers.protocol import FinishReason, GenerateRequest, SamplingParams, TokenDelta, WorkerDrainingError

log = logging.getLogger(__name__)

WORKER_GONE = (RayActorError, ActorDiedError, ActorUnavailableError)


class MigrationsExhausted(RuntimeError):
    pass


async def serve_request(view: ClusterView, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                        cache_salt: str | None, deadline_s: float, max_migrations: int = 3,
                        on_event=None) -> AsyncIterator[TokenDelta]:
    """Yields the request's TokenDeltas; the last one has finish_reason set."""
    generated: list[int] = []
    exclude: set[str] = set()
    migrations = 0
    started = time.monotonic()
    while True:
        plan, prefill_ranked = view.plan(prompt_token_ids + generated, cache_salt, frozenset(exclude))
        decode_id = plan.decode.worker_id
        remaining = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - len(generated))
        attempt_id = request_id if migrations == 0 and not exclude else f"{request_id}#{len(exclude)}"
        req = GenerateRequest(attempt_id, tuple(prompt_token_ids + generated), remaining, cache_salt,
                              prefill_ranked, max(1.0, deadline_s - (time.monotonic() - started)))
        if on_event:
            on_event("routed", plan)
        stream = view.actor(decode_id).generate.options(num_returns="streaming").remote(req)
        view.note_routed(decode_id, +1)
        produced = False
        try:
            async for ref in stream:
                delta: TokenDelta = await ref
                produced = produced or bool(delta.token_ids)
                generated += delta.token_ids
                if migrations or exclude:
                    delta = dataclasses.replace(delta, request_id=request_id,
                                                num_prompt_tokens=len(prompt_token_ids))
                yield delta
                if delta.finished:
                    return
            raise RayActorError(f"decode worker {decode_id} ended the stream without finishing the request")
        except WorkerDrainingError:
            if produced:
                raise
            exclude.add(decode_id)  # it refused before doing anything: try another worker
        except WORKER_GONE as e:
            exclude.add(decode_id)
            if not produced and not generated:
                log.warning("decode worker %s failed before the first token of %s: %r", decode_id, request_id, e)
            migrations += 1
            if on_event:
                on_event("migrated", decode_id)
            if migrations > max_migrations:
                raise MigrationsExhausted(
                    f"request {request_id}: decode workers failed {migrations} times; giving up") from e
            log.warning("decode worker %s died mid-request %s after %d tokens; migrating", decode_id, request_id,
                        len(generated))
        except (asyncio.CancelledError, GeneratorExit):
            ray.cancel(stream)  # the client went away: the decode worker aborts and frees KV on both sides
            raise
        finally:
            view.note_routed(decode_id, -1)


def error_delta(request_id: str, message: str) -> TokenDelta:
    return TokenDelta(request_id, (), "", finish_reason=FinishReason.ERROR, error=message)
