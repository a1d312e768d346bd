"""From an OpenAI request body to what the cluster runs: prompt token ids and SamplingParams,
with the configured input limits. Raises InvalidRequestError (-> HTTP 400) for client mistakes."""

from __future__ import annotations

import functools
import inspect

from router.config import LimitsConfig
from router.openai_models import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from workers.engine.structured_output import grammar_of
from workers.protocol import InvalidRequestError, SamplingParams, StructuredOutput


def completion_prompts(tokenizer, body: CompletionRequest, vocab_size: int) -> list[tuple[list[int], str | None]]:
    """The request's prompts: one for a string or a list of ids, one per item for a list of strings
    or of id lists (OpenAI's batched prompts); each as (token ids, the text as sent or None)."""
    p = body.prompt
    single = isinstance(p, str) or (bool(p) and isinstance(p[0], int))
    items = [p] if single else p
    if not items:
        raise InvalidRequestError("prompt must not be empty", "prompt")
    prompts = []
    for i, item in enumerate(items):
        name = "prompt" if single else f"prompt[{i}]"
        ids = truncated(list(tokenizer(item).input_ids) if isinstance(item, str) else list(item), body)
        if not ids:
            raise InvalidRequestError(f"{name} must not be empty", "prompt")
        check_token_ids(ids, vocab_size, f"{name}: token ids", "prompt")
        prompts.append((ids, item if isinstance(item, str) else None))
    return prompts


def truncated(ids: list[int], body) -> list[int]:
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens (all of them without it)."""
    k = getattr(body, "truncate_prompt_tokens", None)
    return ids[-k:] if k is not None else ids


def check_token_ids(ids, vocab_size: int, what: str, param: str) -> None:
    if any(t < 0 or t >= vocab_size for t in ids):
        raise InvalidRequestError(f"{what} must be in [0, {vocab_size})", param)


def chat_prompt(tokenizer, body: ChatCompletionRequest | TokenizeRequest, tools: list[dict] | None = None) -> list[int]:
    """``tools``: what the template gets as its tools (router/tool_calls.py's ToolPlan)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; use /v1/completions", "messages")
    messages = [m.for_template() for m in body.messages]
    extra = dict(body.chat_template_kwargs or {})
    effort = getattr(body, "reasoning_effort", None)
    if effort is not None:
        if extra.get("reasoning_effort", effort) != effort:
            raise InvalidRequestError("reasoning_effort and chat_template_kwargs.reasoning_effort differ",
                                      "reasoning_effort")
        extra["reasoning_effort"] = effort
    if tools is not None and "tools" in extra:
        raise InvalidRequestError("send the tools in tools, not in chat_template_kwargs", "chat_template_kwargs")
    taken = sorted(set(extra) & _reserved_template_args(type(tokenizer))) if extra else []
    if taken:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(taken)}: they are arguments of the "
                                  "template call itself", "chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                             continue_final_message=body.continue_final_message, tokenize=False,
                                             **({"tools": tools} if tools is not None else {}), **extra)
    except Exception as e:  # template errors are about the messages (or variables) the client sent
        raise InvalidRequestError(f"the chat template rejected these messages: {e}", "messages") from e
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@functools.cache
def _reserved_template_args(tokenizer_class: type) -> frozenset[str]:
    """apply_chat_template's own parameters (tokenize, return_tensors, ...) and the template's
    messages: not variables a request may set (once per tokenizer class)."""
    params = inspect.signature(tokenizer_class.apply_chat_template).parameters
    return frozenset({name for name, p in params.items() if p.kind is not p.VAR_KEYWORD} - {"self"} | {"messages"})


def sampling_params(body: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int, max_model_len: int,
                    limits: LimitsConfig, default_max_tokens: int | None,
                    tool_constraint: StructuredOutput | None = None) -> SamplingParams:
    """``tool_constraint``: a forced tool call's grammar (router/tool_calls.py), which excludes
    any other structured output."""
    if num_prompt_tokens > limits.max_prompt_tokens:
        raise InvalidRequestError(
            f"the prompt has {num_prompt_tokens} tokens; the limit is {limits.max_prompt_tokens}", "prompt")
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {num_prompt_tokens} tokens; this model's context is {max_model_len} tokens", "prompt")
    room = max_model_len - num_prompt_tokens
    asked = body.max_tokens
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        asked = body.max_completion_tokens
    if asked is not None and asked > limits.max_tokens:
        raise InvalidRequestError(f"max_tokens {asked} exceeds this server's limit of {limits.max_tokens}", "max_tokens")
    # asked 0 (echo: the prompt alone): one token runs, and the endpoint leaves it out (Echo)
    max_tokens = 1 if asked == 0 else min(asked or default_max_tokens or limits.max_tokens, room, limits.max_tokens)
    prompt_logprobs = None
    if isinstance(body, CompletionRequest):
        logprobs, top = body.logprobs is not None, body.logprobs or 0
        prompt_logprobs = top if body.echo and logprobs else None
    else:
        logprobs, top = body.logprobs, (body.top_logprobs or 0) if body.logprobs else 0
        if body.top_logprobs and not body.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs: true", "top_logprobs")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        seed=body.seed,
        stop=body.stop_list(), stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
        logprobs=logprobs, top_logprobs=top, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        logit_bias=body.logit_bias_pairs(), min_tokens=body.min_tokens, prompt_logprobs=prompt_logprobs,
        include_stop_str_in_output=body.include_stop_str_in_output, skip_special_tokens=body.skip_special_tokens,
        allowed_token_ids=tuple(body.allowed_token_ids or ()),
        priority=body.priority, structured=checked_structured_output(_one_constraint(body, tool_constraint)),
    )
    params.validate()
    return params


def _one_constraint(body, tool_constraint: StructuredOutput | None) -> StructuredOutput | None:
    spec = body.structured_output()
    if spec is not None and tool_constraint is not None:
        raise InvalidRequestError(f"a forced tool call (tool_choice) is already a structured output; it cannot be "
                                  f"combined with {spec.param}", spec.param)
    return spec or tool_constraint


@functools.lru_cache(maxsize=256)
def _check_grammar(spec: StructuredOutput) -> None:
    grammar_of(spec)  # raises InvalidRequestError; a spec that compiled is remembered


def checked_structured_output(spec: StructuredOutput | None) -> StructuredOutput | None:
    """The request's output constraint once its schema, regex or grammar is known to compile (a
    400 naming the field otherwise), so that a bad one never reaches a worker."""
    if spec is not None:
        spec.validate()
        _check_grammar(spec)
    return spec
