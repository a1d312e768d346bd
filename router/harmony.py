"""gpt-oss's output format, harmony (server.reasoning_parser or server.tool_call_parser: gpt_oss):
the model writes a sequence of messages, each a header, <|message|>, a body and <|end|> (the last
one ends with <|return|> or <|call|>, both EOS tokens, so their text never reaches us):

    <|channel|>analysis<|message|>The user asks about Paris.<|end|>
    <|start|>assistant<|channel|>final<|message|>Sunny in Paris.
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}

(the prompt ends with <|start|>assistant, so the first header has no role). What comes back:

    a recipient functions.NAME           a tool call to NAME with the body as its arguments (the
                                         recipient may stand in the role part or after the channel)
    channel analysis                     reasoning (chat's reasoning_content, the Responses API's
                                         reasoning item); with a recipient too: a call to a built-in
                                         tool (browser.*, python), part of the chain of thought,
                                         which pdserve does not run
    final, commentary                    the answer (content); commentary without a recipient is a
                                         preamble the user sees, with another recipient than a
                                         function the message comes back as text

The markers are special tokens: the router decodes the output with them (skip_special_tokens off)
and no special token's text reaches the client (Harmony.clean). An output that does not start
with a marker (a structured output, a named or required tool choice: their grammar holds from the
first token) is plain text, parsed as the request's tool plan parses it. A call comes back as a call only with tool_choice
"auto" and an output that ended on its own ("stop"); otherwise its arguments join the content, as
a cut-short Hermes call does: nothing the model wrote is dropped but the headers (a header cut
short by max_tokens included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from router.tool_calls import call_id

MESSAGE, END, START = "<|message|>", "<|end|>", "<|start|>"
# what ends a body: <|end|>, or <|return|> / <|call|> where a client's stop_token_ids kept them
BODY_ENDS = (END, "<|return|>", "<|call|>")
MARKERS = (START, END, MESSAGE, "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
FUNCTIONS = "functions."


@dataclass(frozen=True)
class Harmony:
    """The parser's settings for one tokenizer: the text of its special tokens, none of which
    reaches the client (skip_special_tokens is off so that the markers reach the parser: a marker
    where harmony has none, or another special token, is dropped as skip_special_tokens would)."""

    specials: re.Pattern
    longest: int  # characters of the longest special token

    @classmethod
    def of(cls, tokenizer) -> Harmony:
        names = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | set(MARKERS)
        names = sorted(names, key=len, reverse=True)
        return cls(re.compile("|".join(map(re.escape, names))), len(names[0]))

    def clean(self, text: str) -> str:
        return self.specials.sub("", text)

    def held_back(self, text: str) -> int:
        """How many trailing characters of text may be the start of a special token (all of them
        start with "<"): from the last "<" on, where it is near the end and not closed."""
        i = text.rfind("<", max(0, len(text) - self.longest + 1))
        return len(text) - i if i >= 0 and ">" not in text[i:] else 0


@dataclass
class _Header:
    channel: str | None
    recipient: str | None

    @classmethod
    def parse(cls, text: str) -> _Header:
        channel, recipient = _CHANNEL.search(text), _RECIPIENT.search(text)
        return cls(channel.group(1) if channel else None, recipient.group(1) if recipient else None)

    @property
    def kind(self) -> str:
        if self.recipient is not None and self.recipient.startswith(FUNCTIONS):
            return "call"
        return "reasoning" if self.channel == "analysis" else "content"


@dataclass
class HarmonyParser:
    """Incremental: feed(text, final) -> events ("reasoning", text) | ("content", text) |
    ("call", name, arguments) | ("plain", text). Fed the whole output at once it gives what any
    split of it into deltas gives (with the texts of consecutive events joined)."""

    harmony: Harmony
    buf: str = ""
    state: str = "start"  # start | header | body | plain
    header: _Header | None = None
    call_body: str = ""
    events: list[tuple] = field(default_factory=list)

    def feed(self, text: str, final: bool) -> list[tuple]:
        self.buf += text
        self.events = []
        while self._step(final):
            pass
        return self.events

    def _step(self, final: bool) -> bool:
        """One state's work on the buffer; True when the state changed and there may be more."""
        if self.state == "start":
            body = self.buf.lstrip()
            if body.startswith("<|"):
                self.state, self.buf = "header", body
            elif (not body or "<|".startswith(body)) and not final:
                return False  # whitespace, or "<": not decided yet
            else:
                self.state = "plain"
            return True
        if self.state == "plain":
            cut = len(self.buf) - (0 if final else self.harmony.held_back(self.buf))
            text, self.buf = self.harmony.clean(self.buf[:cut]), self.buf[cut:]
            if text:
                self.events.append(("plain", text))
            return False
        if self.state == "header":
            i = self.buf.find(MESSAGE)
            if i < 0:
                if final:  # a header never finished (cut by max_tokens): it says where, not what
                    self.buf = ""
                return False
            self.header, self.buf, self.state, self.call_body = _Header.parse(self.buf[:i]), \
                self.buf[i + len(MESSAGE):], "body", ""
            return True
        # body: up to the first marker that ends it
        ends = [i for i in (self.buf.find(m) for m in BODY_ENDS) if i >= 0]
        end = min(ends) if ends else -1
        if end < 0:
            cut = len(self.buf) - (0 if final else self.harmony.held_back(self.buf))
            self._body(self.buf[:cut])
            self.buf = self.buf[cut:]
            if final:
                self._close()
            return False
        self._body(self.buf[:end])
        marker = next(m for m in BODY_ENDS if self.buf.startswith(m, end))
        self.buf = self.buf[end + len(marker):]
        self._close()
        self.state = "header"
        if self.buf.startswith(START):
            self.buf = self.buf[len(START):]
        return True

    def _body(self, text: str) -> None:
        text = self.harmony.clean(text)
        if not text:
            return
        if self.header.kind == "call":
            self.call_body += text
        else:
            self.events.append((self.header.kind, text))

    def _close(self) -> None:
        if self.header is not None and self.header.kind == "call":
            self.events.append(("call", self.header.recipient[len(FUNCTIONS):], self.call_body.strip()))
        self.header = None


def answer_parts(text: str, finish: str | None, tools, harmony: Harmony) -> tuple[str | None, str | None,
                                                                                 list[dict] | None, str | None]:
    """(reasoning, content, tool calls, finish_reason) of a whole output (tools: its ToolPlan)."""
    stream = HarmonyStream(tools, harmony)
    thought, deltas, reason = stream.add(text, finish)
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls") or ()]
    if stream.plain is not None:  # the tool plan's own parse of plain text
        return None, *tools.message(harmony.clean(text), finish)
    calls = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    return thought or None, content or None, calls or None, reason


@dataclass
class HarmonyStream:
    """One streamed choice: add(text, finish) -> (reasoning delta, chat deltas of content and tool
    calls, finish_reason), as AnswerStream gives them."""

    tools: object  # the request's ToolPlan
    harmony: Harmony
    parser: HarmonyParser = field(init=False)
    plain: object = None  # the tool plan's streamer, once the output turned out to be plain text
    calls: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.parser = HarmonyParser(self.harmony)

    def add(self, text: str, finish: str | None) -> tuple[str, list[dict], str | None]:
        thought, out = "", []
        for e in self.parser.feed(text, finish is not None):
            if e[0] == "plain":
                self.plain = self.plain or self.tools.streamer()
                deltas, _ = self.plain.add(e[1], None)
                out += deltas
            elif e[0] == "reasoning":
                thought += e[1]
            elif e[0] == "content":
                out.append({"content": e[1]})
            else:
                self.calls.append(e[1:])
        if finish is None:
            return thought, _merged(out), None
        if self.plain is not None or self.parser.state == "plain":
            self.plain = self.plain or self.tools.streamer()
            deltas, reason = self.plain.add("", finish)
            return thought, _merged(out + deltas), reason
        if not self.calls:
            return thought, _merged(out), finish
        if self.tools.mode != "auto" or finish != "stop":  # not a call here: its arguments as text
            return thought, _merged(out + [{"content": args} for _, args in self.calls]), finish
        calls = self.calls[:1] if not self.tools.parallel else self.calls
        return thought, _merged(out) + [{"tool_calls": [{"index": i, "id": call_id(), "type": "function",
                                                         "function": {"name": name, "arguments": args}}]}
                                        for i, (name, args) in enumerate(calls)], "tool_calls"


def _merged(deltas: list[dict]) -> list[dict]:
    """Consecutive content deltas as one."""
    out: list[dict] = []
    for d in deltas:
        if out and set(d) == {"content"} and set(out[-1]) == {"content"}:
            out[-1] = {"content": out[-1]["content"] + d["content"]}
        elif d != {"content": ""}:
            out.append(d)
    return out
