"""Tool calls streamed (router/tool_calls.py, pure): an output cut into any pieces gives, through
ToolStream, the content (up to surrounding whitespace) and calls that its whole text gives
(ToolPlan.message), in every tool_choice mode; before the end, auto's content never shows a piece
of "<tool_call>" (a malformed or cut block goes out as text at the end)."""

import json
import random

import pytest

from router.openai_models import ChatCompletionRequest
from router.tool_calls import ToolPlan

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'


def plan(choice) -> ToolPlan:
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                 tool_choice=choice)
    return ToolPlan.of(body, "hermes")


def streamed(p: ToolPlan, pieces: list[str], finish: str):
    s, content, calls, reason = p.streamer(), "", {}, None
    for i, piece in enumerate(pieces):
        deltas, r = s.add(piece, finish if i == len(pieces) - 1 else None)
        reason = r or reason
        for d in deltas:
            content += d.get("content") or ""
            for c in d.get("tool_calls") or ():
                call = calls.setdefault(c["index"], {"name": "", "arguments": ""})
                fn = c.get("function") or {}
                call["name"] += fn.get("name") or ""
                call["arguments"] += fn.get("arguments") or ""
        if i < len(pieces) - 1:  # until the end nothing that may start a call is shown
            assert "<tool" not in content or p.mode != "auto", content
    return content or None, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("choice, text, finish", [
    ("auto", "Let me look." + CALL, "stop"),
    ("auto", "Let me look.\n" + CALL + CALL, "stop"),
    ("auto", "No call here, a < b.", "stop"),
    ("auto", "<tool_call>{not json}</tool_call>", "stop"),
    ("auto", "cut <tool_ca", "length"),
    ("required", '[{"name": "f", "parameters": {"x": 1}}]', "stop"),
    ({"type": "function", "function": {"name": "f"}}, '{"x": 1}', "stop"),
    ("none", "plain text", "stop"),
])
def test_any_pieces_stream_what_the_whole_text_gives(choice, text, finish):
    p = plan(choice)
    content, calls, reason = p.message(text, finish)
    want = ((content.strip() or None) if content is not None and calls else content,
            [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls or ()], reason)
    if want[1]:
        json.loads(want[1][0]["arguments"])
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        got = streamed(p, pieces, finish)
        got = ((got[0].strip() or None) if got[0] is not None and got[1] else got[0], got[1], got[2])
        assert got == want, pieces
