"""Tool (function) calling in chat completions: OpenAI's `tools` and `tool_choice`.

    tool_choice  what the model may do                 how pdserve gets it
    "none"       answer in text                        the tools are not shown to the template
    {"type": "function", "function": {"name": F}}
                 call F                                its output is constrained to F's parameters
                                                       schema (structured output): the arguments
    "required"   call one or more of the tools         its output is constrained to a JSON array of
                                                       {"name": ..., "parameters": ...} (vLLM's form)
    "auto"       either (OpenAI's default with tools)  the model's own tool-call format, parsed from
                                                       its text: needs server.tool_call_parser
                                                       ("hermes": <tool_call>{"name", "arguments"}
                                                       </tool_call>, as Hermes, Qwen 2.5/3 write;
                                                       "gpt_oss": harmony's messages to
                                                       functions.NAME, router/harmony.py)

The tools go to the model's chat template (`tools=`), which says how the model sees them; a
template without tool support shows nothing of them, and then only a forced choice (named or
required) still gets well-formed calls. Calls come back as the message's `tool_calls`, each with
an id and its arguments as JSON text; finish_reason "tool_calls" (a named choice: "stop", as
OpenAI's). Streamed: content while it cannot be part of a call, each call in one chunk once
complete (a named choice's arguments as they come).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from workers.protocol import InvalidRequestError, StructuredOutput

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
HERMES_OPEN = "<tool_call>"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parameters(fn) -> dict:
    """A function's parameters schema; none given: no arguments (an empty object)."""
    return fn.parameters if fn.parameters is not None else {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """How one chat request uses its tools (from the request and server.tool_call_parser)."""

    mode: str  # "none" | "named" | "required" | "auto"
    template_tools: list[dict] | None = None  # what the chat template gets as tools=
    name: str | None = None  # the named choice's function
    constraint: StructuredOutput | None = None
    parallel: bool = True

    @classmethod
    def of(cls, body, parser: str | None) -> ToolPlan:
        tools, choice = body.tools or [], body.tool_choice
        if not tools:
            if choice not in (None, "none"):
                raise InvalidRequestError("tool_choice needs tools", "tool_choice")
            return cls("none")
        template_tools = [t.model_dump(exclude_none=True) for t in tools]
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise InvalidRequestError("tool function names must be distinct", "tools")
        if choice == "none":
            return cls("none")
        if choice is None or choice == "auto":
            if parser is None:
                raise InvalidRequestError(
                    "tool_choice 'auto' (the default with tools) needs the server's tool-call parser: set "
                    "server.tool_call_parser (e.g. hermes) for this model, or send tool_choice 'required' or a "
                    "named function, which work with any model", "tool_choice")
            # hermes: parsed here (_parse); gpt_oss: from harmony's messages (router/harmony.py)
            return cls("auto", template_tools, parallel=body.parallel_tool_calls)
        if choice == "required":
            cases = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                       "parameters": _parameters(t.function)},
                      "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": cases}}
            if not body.parallel_tool_calls:
                schema["maxItems"] = 1
            return cls("required", template_tools, constraint=StructuredOutput("json_schema", json.dumps(schema),
                                                                               "tool_choice"))
        fn = next((t.function for t in tools if t.function.name == choice.function.name), None)
        if fn is None:
            raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                                      "tool_choice")
        return cls("named", template_tools, name=fn.name,
                   constraint=StructuredOutput("json_schema", json.dumps(_parameters(fn)), "tool_choice"))

    # -- whole responses -----------------------------------------------------------------------
    def message(self, text: str, finish: str | None) -> tuple[str | None, list[dict] | None, str | None]:
        """(content, tool_calls, finish_reason) of a finished output."""
        if self.mode == "none":
            return text, None, finish
        if finish != "stop":  # cut short (length, error): what came out, as text
            return text, None, finish
        if self.mode == "named":
            return None, [self._call(self.name, text)], finish
        calls = self._parse(text)
        if calls is None:
            return text, None, finish
        content, calls = calls
        return content, calls, "tool_calls"

    def _call(self, name: str, arguments: str) -> dict:
        return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}

    def _parse(self, text: str) -> tuple[str | None, list[dict]] | None:
        """(content, calls) from a required or auto output; None when it holds no call."""
        if self.mode == "required":  # the grammar's array, unless a stop string cut it short
            try:
                return None, [self._call(i["name"], json.dumps(i["parameters"])) for i in json.loads(text)]
            except (ValueError, KeyError, TypeError):
                return None
        calls = []
        for body in HERMES_CALL.findall(text):
            try:
                item = json.loads(body)
                name, args = item["name"], item.get("arguments", {})
            except (ValueError, KeyError, TypeError):
                return None  # a malformed call: the text goes back as it is
            if not isinstance(name, str):
                return None
            calls.append(self._call(name, args if isinstance(args, str) else json.dumps(args)))
        if not calls:
            return None
        if not self.parallel:
            calls = calls[:1]
        content = text[:text.index(HERMES_OPEN)].strip()
        return content or None, calls

    # -- streams -------------------------------------------------------------------------------
    def streamer(self) -> ToolStream:
        return ToolStream(self)


@dataclass
class ToolStream:
    """One streamed choice: turns its text deltas into chat deltas (content, tool_calls)."""

    plan: ToolPlan
    text: str = ""
    sent: int = 0  # characters of text already sent as content
    named_id: str | None = None
    calls: list[dict] = field(default_factory=list)

    def add(self, delta_text: str, finish: str | None) -> tuple[list[dict], str | None]:
        """The chat deltas to send for this text (maybe none) and the finish_reason to send."""
        plan = self.plan
        self.text += delta_text
        if plan.mode == "none":
            return [{"content": delta_text}], finish
        if plan.mode == "named":
            out = []
            if self.named_id is None:
                self.named_id = call_id()
                out.append({"tool_calls": [{"index": 0, "id": self.named_id, "type": "function",
                                            "function": {"name": plan.name, "arguments": ""}}]})
            if delta_text:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": delta_text}}]})
            return out, finish
        if finish is None:
            return self._content_so_far(), None
        _, calls, reason = plan.message(self.text, finish)
        if calls is None:  # no call after all: the text held back is content
            rest = self.text[self.sent:]
            return ([{"content": rest}] if rest else []), reason
        out = []
        if plan.mode == "auto":  # content before the first call that was still held back
            rest = self.text[self.sent:self.text.index(HERMES_OPEN)]
            if rest.strip():
                out.append({"content": rest})
        return out + [{"tool_calls": [{"index": i, **c}]} for i, c in enumerate(calls)], reason

    def _content_so_far(self) -> list[dict]:
        """auto: text that cannot be (the start of) a call goes out now; required: nothing (its
        whole output is the calls)."""
        if self.plan.mode != "auto":
            return []
        start = self.text.find(HERMES_OPEN)
        if start < 0:  # hold back a tail that may be the start of "<tool_call>"
            start = len(self.text)
            for k in range(min(len(HERMES_OPEN) - 1, len(self.text)), 0, -1):
                if HERMES_OPEN.startswith(self.text[-k:]):
                    start = len(self.text) - k
                    break
        if start <= self.sent:
            return []
        chunk, self.sent = self.text[self.sent:start], start
        return [{"content": chunk}]
