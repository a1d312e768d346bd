"""Turns a request's TokenDeltas into OpenAI responses: whole bodies, or SSE chunks."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from router import harmony
from router.openai_models import (AssistantMessage, ChatChoice, ChatCompletionResponse, ChoiceLogprobs,
                                  CompletionChoice, CompletionLogprobs, CompletionResponse, CompletionTokensDetails,
                                  PromptTokensDetails, TokenLogprob, TopLogprob, Usage)
from router.reasoning import ReasoningStream, split as split_reasoning
from router.tool_calls import ToolPlan
from workers.protocol import FinishReason, TokenDelta


@dataclass(frozen=True)
class Echo:
    """OpenAI's echo for one prompt: its text and ids go before each of its choices' output (and
    its logprobs before theirs)."""
    token_ids: list[int]
    text: str


def without_output(d: TokenDelta) -> TokenDelta:
    """The delta with no output tokens (max_tokens 0 with echo), its prompt logprobs kept."""
    return dataclasses.replace(d, token_ids=(), text="", logprobs=None, top_logprobs=None)


class Accumulator:
    """Everything a request produced so far."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[tuple[tuple[int, float], ...]] = []
        self.finish_reason: FinishReason | None = None
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.prompt_logprobs: tuple[float | None, ...] = ()  # SamplingParams.prompt_logprobs: first delta
        self.prompt_top_logprobs: tuple | None = None
        self.reasoning: str | None = None  # with a reasoning parser: the reasoning text so far

    def add_reasoning(self, text: str | None) -> None:
        """With a reasoning parser (even when there was none: then usage says 0 reasoning tokens)."""
        self.reasoning = (self.reasoning or "") + (text or "")

    def reasoning_tokens(self) -> int | None:
        """The reasoning's tokens, counted by tokenizing its text (the markers around it not
        included), at most the completion's; None without a reasoning parser."""
        if self.reasoning is None:
            return None
        if not self.reasoning:
            return 0
        return min(len(self.token_ids), len(self.tokenizer(self.reasoning, add_special_tokens=False).input_ids))

    def add(self, d: TokenDelta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs or ()
        self.top_logprobs += d.top_logprobs or ()
        self.finish_reason = d.finish_reason or self.finish_reason
        self.num_prompt_tokens = d.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, d.num_cached_tokens)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = d.prompt_logprobs, d.prompt_top_logprobs

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def finish_str(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def completion_logprobs(acc: Accumulator, deltas_ids: list[int], lps: list[float | None], tops,
                        offset0: int) -> CompletionLogprobs:
    """Legacy completions' logprobs for these tokens; a top_logprobs step of None stays None (an
    echoed prompt's first token)."""
    tokens = [acc.token_str(t) for t in deltas_ids]
    offsets, pos = [], offset0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top = [None if step is None else {acc.token_str(t): lp for t, lp in step} for step in tops] if tops else None
    return CompletionLogprobs(tokens=tokens, token_logprobs=list(lps), top_logprobs=top, text_offset=offsets)


def echoed(acc: Accumulator, echo: Echo | None, ids: list[int], text: str, lps: list, tops: list,
           first: bool) -> tuple[list[int], str, list, list]:
    """(ids, text, logprobs, top logprobs) of a choice's output, or of its first chunk, with the
    echoed prompt in front when ``first``."""
    if echo is None or not first:
        return ids, text, lps, tops
    prompt_tops = list(acc.prompt_top_logprobs or ()) if tops or acc.prompt_top_logprobs else []
    return ([*echo.token_ids, *ids], echo.text + text, [*acc.prompt_logprobs, *lps], [*prompt_tops, *tops])


def chat_logprobs(acc: Accumulator, ids: list[int], lps: list[float], tops) -> ChoiceLogprobs:
    content = []
    for i, (t, lp) in enumerate(zip(ids, lps)):
        s = acc.token_str(t)
        alts = [TopLogprob(token=acc.token_str(a), logprob=alp, bytes=list(acc.token_str(a).encode()))
                for a, alp in (tops[i] if tops and i < len(tops) else ())]
        content.append(TokenLogprob(token=s, logprob=lp, bytes=list(s.encode()), top_logprobs=alts))
    return ChoiceLogprobs(content=content)


def usage(accs: list[Accumulator], per_prompt: int | None = None) -> Usage:
    """A request's usage over its choices, ``per_prompt`` consecutive choices for each prompt (all
    of them: one prompt): each prompt counted once, and its cached tokens as the most any of its
    choices found cached; the completion tokens of every choice (and, with a reasoning parser,
    their reasoning tokens)."""
    per_prompt = per_prompt or len(accs)
    groups = [accs[i:i + per_prompt] for i in range(0, len(accs), per_prompt)]
    prompt = sum(max(a.num_prompt_tokens for a in g) for g in groups)
    cached = sum(max(a.num_cached_tokens for a in g) for g in groups)
    completion = sum(len(a.token_ids) for a in accs)
    reasoning = [a.reasoning_tokens() for a in accs]
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                 completion_tokens_details=None if None in reasoning else
                 CompletionTokensDetails(reasoning_tokens=sum(reasoning)))


def completion_body(rid: str, model: str, accs: list[Accumulator], want_logprobs: bool,
                    per_prompt: int | None = None, echoes: list[Echo] | None = None) -> CompletionResponse:
    """``echoes``: one per prompt (choice i answers prompt i // per_prompt), or None."""
    choices = []
    for i, acc in enumerate(accs):
        echo = echoes[i // (per_prompt or len(accs))] if echoes else None
        ids, text, lps, tops = echoed(acc, echo, acc.token_ids, acc.text, acc.logprobs, acc.top_logprobs, True)
        choices.append(CompletionChoice(index=i, text=text, finish_reason=finish_str(acc.finish_reason),
                                        logprobs=completion_logprobs(acc, ids, lps, tops, 0) if want_logprobs else None))
    return CompletionResponse(id=rid, created=int(time.time()), model=model, usage=usage(accs, per_prompt),
                              choices=choices)


def answer_parts(text: str, finish: str | None, tools: ToolPlan,
                 reasoning: bool | harmony.Harmony | None) -> tuple[str | None, str | None, list[dict] | None,
                                                                     str | None]:
    """(reasoning, content, tool calls, finish_reason) of a finished output: the reasoning apart
    (``reasoning``: None, or whether the prompt opened it; router/reasoning.py), then the calls out
    of the answer (router/tool_calls.py). ``reasoning`` a harmony.Harmony: gpt-oss's channels
    say which is which (router/harmony.py)."""
    if isinstance(reasoning, harmony.Harmony):
        return harmony.answer_parts(text, finish, tools, reasoning)
    thought, text = split_reasoning(text, reasoning) if reasoning is not None else (None, text)
    return thought, *tools.message(text, finish)


class AnswerStream:
    """One streamed choice's text split as answer_parts splits the whole: add(text, finish) ->
    (reasoning delta, chat deltas of content and tool calls, finish_reason)."""

    def __init__(self, tools: ToolPlan, reasoning: bool | harmony.Harmony | None):
        is_harmony = isinstance(reasoning, harmony.Harmony)
        self.harmony = harmony.HarmonyStream(tools, reasoning) if is_harmony else None
        self.thought = ReasoningStream(reasoning) if reasoning is not None and not is_harmony else None
        self.tools = tools.streamer()

    def add(self, text: str, finish: str | None) -> tuple[str, list[dict], str | None]:
        if self.harmony is not None:
            return self.harmony.add(text, finish)
        thought, text = self.thought.add(text, finish is not None) if self.thought is not None else ("", text)
        return (thought, *self.tools.add(text, finish))


def chat_body(rid: str, model: str, accs: list[Accumulator], want_logprobs: bool, tools: ToolPlan,
              reasoning: bool | harmony.Harmony | None = None) -> ChatCompletionResponse:
    """``tools`` and ``reasoning``: as answer_parts takes them."""
    choices = []
    for i, acc in enumerate(accs):
        thought, content, calls, finish = answer_parts(acc.text, finish_str(acc.finish_reason), tools, reasoning)
        if reasoning is not None:
            acc.add_reasoning(thought)
        choices.append(ChatChoice(index=i, message=AssistantMessage(content=content, reasoning_content=thought,
                                                                    tool_calls=calls),
                                  finish_reason=finish, logprobs=chat_logprobs(acc, acc.token_ids, acc.logprobs,
                                                                               acc.top_logprobs)
                                  if want_logprobs else None))
    return ChatCompletionResponse(id=rid, created=int(time.time()), model=model, usage=usage(accs), choices=choices)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def completion_chunk(rid: str, model: str, created: int, d: TokenDelta, acc: Accumulator, want_logprobs: bool,
                     text_offset: int, index: int = 0, echo: Echo | None = None, first: bool = False) -> dict:
    """``echo`` and ``first`` (this choice's first chunk): its prompt (text and logprobs) comes first."""
    ids, text, lps, tops = echoed(acc, echo, list(d.token_ids), d.text, list(d.logprobs or ()),
                                  list(d.top_logprobs or ()), first)
    choice = {"index": index, "text": text, "finish_reason": finish_str(d.finish_reason), "logprobs": None}
    if want_logprobs and ids:
        choice["logprobs"] = completion_logprobs(acc, ids, lps, tops, text_offset).model_dump()
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None,
               logprobs: ChoiceLogprobs | None = None, index: int = 0) -> dict:
    choice = {"index": index, "delta": delta, "finish_reason": finish,
              "logprobs": logprobs.model_dump() if logprobs else None}
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, obj: str, accs: list[Accumulator],
                per_prompt: int | None = None) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(accs, per_prompt).model_dump()}


async def chunk_events(rid: str, model: str, created: int, chat: bool, first, deltas, accs: list[Accumulator],
                       make_chunk, usage_obj: str | None, per_prompt: int, stream_error):
    """The SSE text of a completions or chat stream of len(accs) choices: ``first`` (index, delta)
    already awaited (routed), the rest from ``deltas`` (fanout.merge), which is closed at the end.
    make_chunk(d, acc, created, text_offset, index) gives a delta's chunks; ``usage_obj``: the
    object of a last usage chunk (None: none). A failure once the status line is sent is an error
    event with stream_error(exception), then [DONE]."""
    n = len(accs)
    offsets, running = [0] * n, n
    if chat:
        for i in range(n):
            yield sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None, index=i))
    try:
        i, d = first
        while True:
            accs[i].add(d)
            if d.error:
                yield sse({"error": {"message": d.error, "type": "server_error", "param": None,
                                     "code": "request_failed"}})
                break
            for out in make_chunk(d, accs[i], created, offsets[i], i):  # 0 or more chunks
                yield sse(out)
                offsets[i] += len(out["choices"][0].get("text") or "")  # completions' text_offset
            if d.finished:
                running -= 1
                if not running:
                    break
            i, d = await deltas.__anext__()
        if usage_obj is not None:
            yield sse(usage_chunk(rid, model, created, usage_obj, accs, per_prompt))
    except Exception as e:  # the status line is sent: the stream itself must say it failed
        yield sse({"error": stream_error(e)})
    finally:
        await deltas.aclose()
    yield SSE_DONE
