"""A request's state inside one engine."""

from __future__ import annotations

import time
from enum import Enum

from workers.block_hash import BlockHasher
from workers.engine.detokenizer import Detokenizer
from workers.engine.prompt_logprobs import PromptLogprobs
from workers.protocol import FinishReason, InvalidRequestError, SamplingParams


class RequestStatus(str, Enum):
    WAITING = "waiting"  # queued; holds no blocks (also after preemption)
    RUNNING = "running"  # scheduled; holds blocks for [0, num_computed_tokens)
    PINNED = "pinned"  # prefill-only request done: blocks held for a KV handle until released
    RESERVED = "reserved"  # decode side: blocks allocated, waiting for their KV to arrive
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                 block_size: int, cache_salt: str | None = None, prefill_only: bool = False):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling = sampling
        self.has_penalties = sampling.has_penalties  # read every step (penalties.py): a plain attribute
        self.cache_salt = cache_salt
        self.prefill_only = prefill_only
        self.output_token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = time.time()
        self.priority = sampling.priority  # lower first: the scheduler's queues are ordered by it
        self.num_tokens = len(self.prompt_token_ids)  # prompt + outputs known to the host (append_output)
        # KV state:  block_ids cover tokens [0, num_computed_tokens) and room for what is scheduled.
        # A tuple, replaced (never mutated) when blocks come or go: a step's SeqSlice shares it as is
        self.block_ids: tuple[int, ...] = ()
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit at first admission (reported to clients)
        self.num_hashed_blocks = 0  # block_ids[:num_hashed_blocks] are published in the prefix cache
        self.num_preemptions = 0
        # async scheduling: tokens sampled by a launched step that the host has not read yet (the
        # KV of [0, num_computed_tokens) may include the first of them, fed from the device);
        # 0 or 1 between steps. pending_row: the newest such token's row in that step's sample.
        self.num_pending = 0
        self.pending_row = 0
        self.retired = False  # its pending token is its last (length): already out of the scheduler
        self.hasher = BlockHasher(block_size, cache_salt)
        self.detok: Detokenizer | None = None
        self.num_emitted_tokens = 0
        # layer-wise KV export: factory(block_ids) -> hook(layer, wait_written) | None, called once,
        # for the step that completes the prompt; a hook that raised fails the request
        self.layer_hook_factory = None
        self.layer_hook_error: str | None = None
        # SamplingParams.prompt_logprobs: collected while the prompt is computed, until its first
        # delta takes them (then None). While set, the prompt gets no prefix-cache hit (scheduler)
        self.prompt_logprobs: PromptLogprobs | None = None
        # SamplingParams.structured: a GrammarState (its xgrammar matcher, after any reasoning)
        # past every output token the host knows (Engine._new_request, _append_token); None without
        self.grammar = None
        self.allowed_mask = None  # SamplingParams.allowed_token_ids as a token bitmask (Engine._new_request)
        if sampling.prompt_logprobs is not None:
            self.prompt_logprobs = PromptLogprobs(len(self.prompt_token_ids), sampling.prompt_logprobs)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def append_output(self, token_id: int) -> None:
        """The one way an output token is added (keeps num_tokens)."""
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (decode steps read one token)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        if end <= n:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens_with_pending(self) -> int:
        """Tokens of the sequence including those only the device knows yet."""
        return self.num_tokens + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """Still computing tokens it already knows (the prompt, or the prompt + outputs after a
        preemption); no token is sampled until it has caught up."""
        return self.num_computed_tokens < self.num_tokens - 1

    def block_hashes(self) -> list[int]:
        return self.hasher.extend(self.all_token_ids)


def check_new_request(prompt_token_ids, sampling, *, has_tokenizer: bool, vocab_size: int, max_model_len: int,
                      block_size: int, num_blocks: int) -> list[int]:
    """A new request's prompt as a list, or InvalidRequestError saying what is wrong with it."""
    if not isinstance(sampling, SamplingParams):
        raise InvalidRequestError("sampling must be a SamplingParams")
    sampling.validate()
    if sampling.stop and not has_tokenizer:
        raise InvalidRequestError("stop strings need a tokenizer; this model has none (use stop_token_ids)", "stop")
    prompt = list(prompt_token_ids)
    if not prompt:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if any(not isinstance(t, int) or t < 0 or t >= vocab_size for t in prompt):
        raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})", "prompt")
    if any(t >= vocab_size for t, _ in sampling.logit_bias):
        raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab_size})", "logit_bias")
    if len(prompt) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(prompt)} tokens; this model's context is {max_model_len} tokens "
            f"(prompt + at least 1 generated token)", "prompt")
    if -(-(len(prompt) + 1) // block_size) > num_blocks:
        raise InvalidRequestError(
            f"the prompt needs more KV blocks than this worker has ({num_blocks} x {block_size} tokens)", "prompt")
    return prompt
