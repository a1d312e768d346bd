"""OpenAI's Responses API (POST /v1/responses), on the chat path: a request becomes the chat
request it means (instructions as the system message, input items as turns, function calls and
their outputs as assistant tool_calls and tool turns, text.format as response_format, flat tools
as chat tools), runs as one, and its output comes back as Responses output items (a message with
output_text, function_call items), whole or as the Responses stream's events.

Stateless: pdserve stores no response, so ``previous_response_id`` (and a stored conversation) is
a 400, and every answer says ``"store": false``. Input other than text (images, files) is a 400.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from router.openai_format import Accumulator, AnswerStream, answer_parts, finish_str
from router.openai_models import ChatCompletionRequest, FunctionDef
from router.output_constraints import StructuredOutputs
from router.tool_calls import ToolPlan, call_id
from workers.protocol import MAX_PRIORITY, MIN_PRIORITY, InvalidRequestError


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str
    output: str


class ReasoningText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning_text"]
    text: str


class ReasoningInputItem(BaseModel):
    """A reasoning item of an earlier answer, passed back: the next assistant turn's
    reasoning_content (what a stateless tool loop sends with its function_call)."""
    model_config = ConfigDict(extra="ignore")  # id, summary, encrypted_content: not used

    type: Literal["reasoning"]
    content: list[ReasoningText] | None = None

    def text(self) -> str:
        return "".join(p.text for p in self.content or ())


class ResponsesTool(FunctionDef):
    type: Literal["function"]


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # summary: not produced (the reasoning item has the text)

    effort: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    """What pdserve takes of a Responses request; other fields are ignored, as in the chat API."""
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningInputItem] = Field(
        ..., description="Text, or turns: messages (text parts), function_call, function_call_output and reasoning "
                         "items (an earlier answer's, for the assistant turn after it)")
    instructions: str | None = Field(None, description="The system message")
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: StrictBool = False
    tools: list[ResponsesTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = Field(None, description="effort: the chat request's reasoning_effort")
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    seed: int | None = None
    # vLLM's extras, as on chat completions
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's: one constraint (see chat)")
    priority: StrictInt = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY, description="vLLM's: lower is served first")
    previous_response_id: str | None = Field(None, description="Not supported: pdserve stores no responses")
    store: StrictBool | None = Field(None, description="Accepted; nothing is stored (the answer says store: false)")

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this one means; InvalidRequestError for what it cannot be."""
        if self.previous_response_id is not None:
            raise InvalidRequestError("previous_response_id is not supported: pdserve stores no responses; send the "
                                      "whole conversation as input", "previous_response_id")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        thought = None  # a reasoning item's text, for the assistant turn after it
        for item in items:
            if isinstance(item, ReasoningInputItem):
                thought = (thought or "") + item.text()
            elif isinstance(item, InputMessage):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                            "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
                    last["tool_calls"].append(call)  # consecutive calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            if thought is not None and messages and messages[-1]["role"] == "assistant":
                messages[-1]["reasoning_content"], thought = thought, None
        if not messages or messages[-1]["role"] == "system":
            raise InvalidRequestError("input has no turn to answer", "input")
        chat = {"model": self.model, "messages": messages, "max_completion_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "parallel_tool_calls": self.parallel_tool_calls, "priority": self.priority,
                "reasoning_effort": self.reasoning.effort if self.reasoning is not None else None}
        if self.structured_outputs is not None:
            chat["structured_outputs"] = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
        if self.tools:
            chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, NamedFunction):
            chat["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.name or "output", "schema": fmt.schema_, "strict": fmt.strict}}
        elif fmt is not None:
            chat["response_format"] = {"type": fmt.type}
        try:
            return ChatCompletionRequest.model_validate(chat)
        except ValidationError as e:
            err = e.errors()[0]
            raise InvalidRequestError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}", "input") from e


def _usage(acc: Accumulator) -> dict:
    return {"input_tokens": acc.num_prompt_tokens, "input_tokens_details": {"cached_tokens": acc.num_cached_tokens},
            "output_tokens": len(acc.token_ids),
            "output_tokens_details": {"reasoning_tokens": acc.reasoning_tokens() or 0},
            "total_tokens": acc.num_prompt_tokens + len(acc.token_ids)}


def message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or
            status == "completed" else []}


def call_item(item_id: str, call: dict, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": status}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "reasoning", "id": item_id, "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if status == "completed" else []}


def item_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex[:24]}"


class ResponseBuilder:
    """One request's Responses answer: the response object, whole or as stream events."""

    def __init__(self, rid: str, model: str, body: ResponsesRequest, plan: ToolPlan,
                 reasoning=None):
        """``reasoning``: None, whether the prompt opened the model's reasoning (router/reasoning.py),
        or a harmony.Harmony (gpt-oss's channels, router/harmony.py)."""
        self.rid, self.model, self.body, self.plan, self.reasoning = rid, model, body, plan, reasoning
        self.created = int(time.time())
        self.seq = 0
        self.stream = AnswerStream(plan, reasoning)
        self.output: list[dict] = []  # items done so far (streaming)
        self.open: dict | None = None  # the item being streamed: {"kind", "id", "text"} (a call's: + "call")

    def response(self, status: str, output: list[dict], acc: Accumulator | None = None,
                 incomplete: str | None = None, error: dict | None = None) -> dict:
        b = self.body
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "model": self.model, "status": status,
            "output": output, "usage": _usage(acc) if acc is not None else None,
            "incomplete_details": {"reason": incomplete} if incomplete else None, "error": error,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "temperature": b.temperature,
            "top_p": b.top_p, "tools": [t.model_dump(exclude_none=True) for t in b.tools or ()],
            "tool_choice": b.tool_choice.model_dump() if isinstance(b.tool_choice, NamedFunction)
            else (b.tool_choice or "auto"), "parallel_tool_calls": b.parallel_tool_calls,
            "text": {"format": b.text.format.model_dump(by_alias=True, exclude_none=True)}
            if b.text is not None and b.text.format is not None else {"format": {"type": "text"}},
            "metadata": b.metadata or {}, "store": False, "previous_response_id": None, "user": b.user,
        }

    def finished(self, acc: Accumulator) -> dict:
        """The whole response of a finished request."""
        finish = finish_str(acc.finish_reason)
        thought, content, calls, _ = answer_parts(acc.text, finish, self.plan, self.reasoning)
        if self.reasoning is not None:
            acc.add_reasoning(thought)
        output = [reasoning_item(item_id("rs"), thought)] if thought else []
        output += [message_item(item_id("msg"), content)] if content or not calls else []
        output += [call_item(item_id("fc"), c) for c in calls or ()]
        return self._final(acc, output)

    def _final(self, acc: Accumulator, output: list[dict]) -> dict:
        length = acc.finish_reason is not None and acc.finish_reason.value == "length"
        return self.response("incomplete" if length else "completed", output, acc,
                             incomplete="max_output_tokens" if length else None)

    # -- streaming -------------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> dict:
        e = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return e

    def start(self) -> list[dict]:
        r = self.response("in_progress", [])
        return [self.event("response.created", response=r), self.event("response.in_progress", response=r)]

    def add(self, text: str, finish: str | None, acc: Accumulator) -> list[dict]:
        """The events for a delta's text (and, when it is the last, the closing ones)."""
        thought, deltas, _ = self.stream.add(text, finish)
        if self.reasoning is not None:
            acc.add_reasoning(thought)
        events = self._reasoning(thought) if thought else []
        for d in deltas:
            if d.get("content"):
                events += self._text(d["content"])
            for call in d.get("tool_calls") or ():
                events += self._call(call)
        if finish is not None:
            events += self._close()
            final = self._final(acc, self.output)
            events.append(self.event("response.incomplete" if final["status"] == "incomplete"
                                     else "response.completed", response=final))
        return events

    def failed(self, message: str, code: str) -> list[dict]:
        error = {"code": code, "message": message}
        return [self.event("response.failed", response=self.response("failed", self.output, error=error))]

    def _reasoning(self, text: str) -> list[dict]:
        events = [] if self._is_open("reasoning") else self._open("reasoning", reasoning_item(item_id("rs"), "",
                                                                                               "in_progress"))
        self.open["text"] += text
        return events + [self.event("response.reasoning_text.delta", item_id=self.open["id"],
                                    output_index=len(self.output), content_index=0, delta=text)]

    def _text(self, text: str) -> list[dict]:
        events = []
        if not self._is_open("message"):
            events = self._open("message", message_item(item_id("msg"), "", "in_progress"))
            events.append(self.event("response.content_part.added", item_id=self.open["id"],
                                     output_index=len(self.output), content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": []}))
        self.open["text"] += text
        return events + [self.event("response.output_text.delta", item_id=self.open["id"],
                                    output_index=len(self.output), content_index=0, delta=text, logprobs=[])]

    def _call(self, delta: dict) -> list[dict]:
        """A tool_calls delta of the chat stream: a whole call (auto, required), or a named call's
        start (id, name) and then its argument pieces."""
        fn, events = delta.get("function") or {}, []
        if delta.get("id") is not None or not self._is_open("function_call"):  # a new call
            call = {"id": delta.get("id") or call_id(), "function": {"name": fn.get("name", ""), "arguments": ""}}
            events = self._open("function_call", call_item(item_id("fc"), call, "in_progress"), call=call)
        if fn.get("arguments"):
            self.open["call"]["function"]["arguments"] += fn["arguments"]
            events.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                                     output_index=len(self.output), delta=fn["arguments"]))
        if self.plan.mode != "named":  # auto / required calls come whole: done at once
            events += self._close()
        return events

    # the one output item being streamed: opening another closes it
    def _is_open(self, kind: str) -> bool:
        return self.open is not None and self.open["kind"] == kind

    def _open(self, kind: str, item: dict, **state) -> list[dict]:
        events = self._close()
        self.open = {"kind": kind, "id": item["id"], "text": "", **state}
        return events + [self.event("response.output_item.added", output_index=len(self.output), item=item)]

    def _close(self) -> list[dict]:
        """The open item's closing events (none when nothing is open); it joins the output."""
        o, self.open = self.open, None
        if o is None:
            return []
        index, at = len(self.output), {"item_id": o["id"], "output_index": len(self.output)}
        if o["kind"] == "reasoning":
            item = reasoning_item(o["id"], o["text"])
            done = [self.event("response.reasoning_text.done", **at, content_index=0, text=o["text"])]
        elif o["kind"] == "message":
            item = message_item(o["id"], o["text"])
            done = [self.event("response.output_text.done", **at, content_index=0, text=o["text"], logprobs=[]),
                    self.event("response.content_part.done", **at, content_index=0, part=item["content"][0])]
        else:
            item = call_item(o["id"], o["call"])
            done = [self.event("response.function_call_arguments.done", **at,
                               arguments=o["call"]["function"]["arguments"])]
        self.output.append(item)
        return done + [self.event("response.output_item.done", output_index=index, item=item)]


def sse_event(e: dict) -> str:
    return f"event: {e['type']}\ndata: {json.dumps(e, separators=(',', ':'))}\n\n"


async def event_stream(builder: ResponseBuilder, acc: Accumulator, first, deltas, stream_error):
    """The Responses stream (SSE text) of one request's deltas: ``first`` already awaited (routed),
    the rest from ``deltas``, which is closed at the end; a failure once the status line is sent is
    a response.failed event, with stream_error(exception)'s message and code."""
    for e in builder.start():
        yield sse_event(e)
    try:
        d = first
        while True:
            acc.add(d)
            if d.error:
                for e in builder.failed(d.error, "request_failed"):
                    yield sse_event(e)
                return
            for e in builder.add(d.text, finish_str(d.finish_reason), acc):
                yield sse_event(e)
            if d.finished:
                return
            d = await deltas.__anext__()
    except Exception as e:
        err = stream_error(e)
        for ev in builder.failed(err["message"], err["code"]):
            yield sse_event(ev)
    finally:
        await deltas.aclose()
