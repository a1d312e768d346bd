"""The engine's disaggregation split points (a mixin of Engine, workers/engine/engine.py).

Prefill side: a prefill-only request's blocks stay pinned after its first token (_pin) until
release_handle(). Decode side: reserve_import() allocates the blocks a peer writes the prompt's KV
into, commit_import() starts decoding from the first token sampled over there, abort() (Engine)
frees a reservation that will not be committed. While an import finds too few free blocks, the
scheduler holds the blocks it asked for back from requests that come after it (a higher priority
value, or equal and arrived later: want_for_import).

Uses Engine's pool, scheduler, requests, block_size, config, layout, kv_cache, worker_id,
_launched, max_model_len, runner.eos_token_ids, _new_request, _publish_blocks and _append_token.
"""

from __future__ import annotations

import dataclasses
import time

from workers.engine.block_pool import NoFreeBlocks
from workers.engine.outputs import ImportReservation
from workers.engine.request import Request, RequestStatus
from workers.engine.token_outcome import is_stop_token, next_is_last_by_length
from workers.protocol import KVHandle, SamplingParams, TokenDelta


class SplitPoints:
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
        """Tokens of this prompt whose KV is already cached here (full blocks). Safe to call from a
        thread other than the engine's: it only reads (dict lookups and set membership, each atomic
        under the GIL), so the answer is advisory (a block can be evicted right after)."""
        from workers.block_hash import block_hashes

        return len(self.pool.lookup(block_hashes(prompt_token_ids, self.block_size, cache_salt))) * self.block_size

    def reserve_import(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       cache_salt: str | None = None) -> ImportReservation:
        """Allocate blocks for a prompt whose KV will be written into them from elsewhere.
        Raises NoFreeBlocks when they are not free right now (nothing is held then)."""
        req = self._new_request(request_id, prompt_token_ids, sampling, cache_salt, prefill_only=False)
        req.prompt_logprobs = None  # computed where it was prefilled: they come with commit_import
        n = req.num_prompt_tokens
        hits = self.pool.lookup(req.block_hashes())[: n // self.block_size] if self.config.enable_prefix_caching else []
        need = -(-n // self.block_size) - len(hits)
        if need > self.pool.num_free_after_touch(hits):
            self.scheduler.want_for_import(request_id, need, req.priority)
            raise NoFreeBlocks(f"{need} blocks needed for an import, {self.pool.num_free} free")
        self.scheduler.withdraw_import(request_id)
        self.pool.touch(hits)
        req.block_ids = tuple(hits + self.pool.allocate(need))
        self._launched.wait_for_blocks(req.block_ids)  # a peer writes them outside the device's order
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

    def commit_import(self, request_id: str, first_token_id: int | None = None, first_logprob: float | None = None,
                      first_top_logprobs=None, num_cached_tokens: int | None = None,
                      handle: KVHandle | None = None) -> TokenDelta:
        """The reserved blocks now hold the prompt's KV: continue from the first sampled token,
        given as is or as the prefill side's ``handle`` (its first token, cached-token count and
        prompt logprobs)."""
        req = self.requests.get(request_id)
        if req is None or req.status != RequestStatus.RESERVED:
            raise KeyError(f"no reserved import for request {request_id!r}")
        if handle is not None:
            first_token_id, first_logprob, first_top_logprobs = (handle.first_token_id, handle.first_logprob,
                                                                  handle.first_top_logprobs)
            num_cached_tokens = handle.num_cached_tokens
        elif first_token_id is None:
            raise ValueError("commit_import needs the first token or the handle")
        req.num_computed_tokens = req.num_prompt_tokens
        if num_cached_tokens is not None:
            req.num_cached_tokens = max(req.num_cached_tokens, num_cached_tokens)
        self._publish_blocks(req)
        self.scheduler.add_running(req)
        return _with_prompt_logprobs(self._append_token(req, first_token_id, first_logprob, first_top_logprobs),
                                     handle)

    def finish_import(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                      handle: KVHandle, cache_salt: str | None = None) -> TokenDelta:
        """A remote prefill whose first token ended the request (handle.final: the prefill side
        freed its blocks): that token's final delta, with no KV moved and no block taken here."""
        if not handle.final:
            raise ValueError(f"{request_id}: the handle holds blocks; import it (reserve_import, commit_import)")
        req = self._new_request(request_id, prompt_token_ids, sampling, cache_salt, prefill_only=False)
        req.prompt_logprobs = None
        req.num_cached_tokens = handle.num_cached_tokens
        req.status = RequestStatus.RUNNING
        self.requests[request_id] = req
        delta = self._append_token(req, handle.first_token_id, handle.first_logprob, handle.first_top_logprobs)
        if not delta.finished:  # the prefill side's _pin said it would
            self.requests.pop(request_id, None)
            raise RuntimeError(f"internal: {request_id}'s first token did not end it here")
        return _with_prompt_logprobs(delta, handle)

    def _num_held_blocks(self) -> int:
        return sum(len(r.block_ids) for r in self.requests.values()
                   if r.status in (RequestStatus.PINNED, RequestStatus.RESERVED))

    def _pin(self, req: Request, token_id: int, logprob, top) -> KVHandle:
        """The handle of a prefill-only request's first token; its blocks stay pinned for a peer's
        READ, unless that token ends the request (then nobody needs the KV: the blocks are freed
        now, cached as any finished request's, and the handle is final). A layer-wise request keeps
        them pinned: its WRITEs may still be reading them."""
        self.scheduler.running.remove(req)
        req.status = RequestStatus.PINNED
        # what _append_token would end the request by, on the decode side (stop strings aside)
        final = req.layer_hook_factory is None and (
            next_is_last_by_length(req, self.max_model_len)
            or is_stop_token(req.sampling, token_id, self.runner.eos_token_ids))
        prompt_lps = prompt_tops = None
        if req.prompt_logprobs is not None:
            prompt_lps, prompt_tops = req.prompt_logprobs.result()
            req.prompt_logprobs = None
        handle = KVHandle(
            request_id=req.request_id, worker_id=self.worker_id, block_ids=() if final else tuple(req.block_ids),
            num_tokens=req.num_prompt_tokens, first_token_id=token_id, first_logprob=logprob,
            first_top_logprobs=tuple(top) if top else None, compat_hash=self.layout.compat_hash(),
            kv_epoch=self.kv_cache.epoch, lease_ttl_s=0.0, expires_at=time.time(),
            num_cached_tokens=req.num_cached_tokens, prompt_logprobs=prompt_lps, prompt_top_logprobs=prompt_tops,
            final=final,
        )
        if final:
            self.release_handle(req.request_id)
        return handle


def _with_prompt_logprobs(delta: TokenDelta, handle: KVHandle | None) -> TokenDelta:
    """The first delta of an imported request, with the prompt logprobs its prefill computed."""
    if handle is None or handle.prompt_logprobs is None:
        return delta
    return dataclasses.replace(delta, prompt_logprobs=handle.prompt_logprobs,
                               prompt_top_logprobs=handle.prompt_top_logprobs)
