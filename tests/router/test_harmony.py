"""gpt-oss's harmony output parsed (router/harmony.py), its pure parts: a whole output's channels
as reasoning, content and tool calls under each tool plan, and the same output streamed in any
pieces giving the same parts. Through the endpoint: tests/serving/test_harmony_endpoint.py."""

import json
import random
from types import SimpleNamespace

import pytest

from router.harmony import Harmony, HarmonyStream, answer_parts
from router.tool_calls import ToolPlan

ANALYSIS = "<|channel|>analysis<|message|>The user asks about Paris.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>Sunny in Paris."
CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
CALL_IN_ROLE = '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
PREAMBLE = "<|start|>assistant<|channel|>commentary<|message|>Let me look.<|end|>"
WEATHER = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
# a tokenizer's special tokens besides the markers (gpt-oss's <|endoftext|>, <|reserved_...|>)
HARMONY = Harmony.of(SimpleNamespace(added_tokens_decoder={
    1: SimpleNamespace(content="<|endoftext|>", special=True), 2: SimpleNamespace(content="<|im_end|>", special=True),
    3: SimpleNamespace(content="<think>", special=False)}))


def plan(mode: str = "auto", parallel: bool = True) -> ToolPlan:
    return ToolPlan(mode, [], parallel=parallel)


def parts(text, finish="stop", tools=None):
    thought, content, calls, reason = answer_parts(text, finish, tools or plan(), HARMONY)
    return thought, content, [c["function"] for c in calls] if calls else calls, reason


CASES = [
    # (output, finish, plan) -> (reasoning, content, calls, finish_reason)
    ((ANALYSIS + FINAL, "stop", "auto"), ("The user asks about Paris.", "Sunny in Paris.", None, "stop")),
    ((ANALYSIS + FINAL, "stop", "none"), ("The user asks about Paris.", "Sunny in Paris.", None, "stop")),
    ((FINAL[len("<|start|>assistant"):], "stop", "none"), (None, "Sunny in Paris.", None, "stop")),
    ((ANALYSIS + CALL, "stop", "auto"), ("The user asks about Paris.", None, [WEATHER], "tool_calls")),
    ((ANALYSIS + CALL_IN_ROLE, "stop", "auto"), ("The user asks about Paris.", None, [WEATHER], "tool_calls")),
    ((ANALYSIS + PREAMBLE + CALL, "stop", "auto"), ("The user asks about Paris.", "Let me look.", [WEATHER],
                                                   "tool_calls")),
    # a call where the request offered no tools to call (tool_choice none), or one cut short: as text
    ((ANALYSIS + CALL, "stop", "none"), ("The user asks about Paris.", '{"city": "Paris"}', None, "stop")),
    ((ANALYSIS + CALL[:-3], "length", "auto"), ("The user asks about Paris.", '{"city": "Pari', None, "length")),
    # cut short in the reasoning, or in the second header (headers never reach the client)
    ((ANALYSIS[:-12], "length", "auto"), ("The user asks about P", None, None, "length")),
    ((ANALYSIS + "<|start|>assistant<|chan", "length", "auto"), ("The user asks about Paris.", None, None, "length")),
    # markers the model did not write: plain text, the tool plan's own parse (a structured output)
    (("Sunny in Paris.", "stop", "none"), (None, "Sunny in Paris.", None, "stop")),
    (("  <b>Sunny</b>", "stop", "none"), (None, "  <b>Sunny</b>", None, "stop")),
    (('{"city": "Paris"}', "stop", "named"), (None, None, [WEATHER], "stop")),
    # a built-in tool's call (browser, python) is in the analysis channel: part of the reasoning;
    # a commentary message to anything but a function: text; the recipient right before <|constrain|>
    (("<|channel|>analysis to=browser.search<|message|>{\"q\": 1}<|end|>" + FINAL, "stop", "auto"),
     ('{"q": 1}', "Sunny in Paris.", None, "stop")),
    (("<|channel|>commentary to=container.exec<|message|>ls<|end|>" + FINAL, "stop", "auto"),
     (None, "lsSunny in Paris.", None, "stop")),
    (('<|channel|>commentary to=functions.get_weather<|constrain|>json<|message|>{"city": "Paris"}', "stop", "auto"),
     (None, None, [WEATHER], "tool_calls")),
    # special tokens where harmony has none (a random or derailed model) never reach the client;
    # text that merely looks like one stays
    (("<|channel|>final<|message|>Sunny<|start|> in<|endoftext|> Paris<think>.", "stop", "none"),
     (None, "Sunny in Paris<think>.", None, "stop")),
    (("Sunny<|channel|> in<|im_end|> Paris <b>.</b> <|x|>", "stop", "none"), (None, "Sunny in Paris <b>.</b> <|x|>",
                                                                             None, "stop")),
    # <|return|> kept by a client's stop_token_ids ends the body too
    ((ANALYSIS + FINAL + "<|return|>", "stop", "auto"), ("The user asks about Paris.", "Sunny in Paris.", None,
                                                         "stop")),
]


def _plan(name: str) -> ToolPlan:
    return ToolPlan("named", [], name="get_weather") if name == "named" else plan(name)


@pytest.mark.parametrize("case, want", CASES)
def test_whole_output(case, want):
    text, finish, mode = case
    assert parts(text, finish, _plan(mode)) == want


@pytest.mark.parametrize("case, want", CASES)
def test_any_streamed_pieces_give_the_same_parts(case, want):
    text, finish, mode = case
    rng = random.Random(0)
    for _ in range(60):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 10))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])] or [""]
        stream, thought, content, calls, reason = HarmonyStream(_plan(mode), HARMONY), "", "", [], None
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            r, deltas, fin = stream.add(piece, finish if last else None)
            assert last or fin is None
            thought += r
            for d in deltas:
                assert not any(HARMONY.specials.search(v) for v in d.values() if isinstance(v, str)), (pieces, d)
                content += d.get("content") or ""
                for c in d.get("tool_calls") or ():
                    if "id" in c:
                        calls.append(dict(c["function"]))
                    else:  # a named choice's arguments as they come
                        calls[c["index"]]["arguments"] += c["function"]["arguments"]
            reason = fin or reason
        assert (thought or None, content or None, calls or None, reason) == want, pieces


def test_only_one_call_without_parallel_calls():
    two = ANALYSIS + CALL + "<|end|>" + CALL.replace("Paris", "Lyon")
    assert parts(two)[2] == [WEATHER, {"name": "get_weather", "arguments": '{"city": "Lyon"}'}]
    assert parts(two, tools=plan(parallel=False))[2] == [WEATHER]


def test_calls_carry_ids_and_arguments_as_json_text():
    _, _, calls, _ = answer_parts(ANALYSIS + CALL, "stop", plan(), HARMONY)
    (call,) = calls
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_the_config_turns_harmony_on_from_either_key():
    from cluster.config import ServerConfig

    assert ServerConfig(reasoning_parser="gpt_oss").harmony and ServerConfig(tool_call_parser="gpt_oss").harmony
    assert ServerConfig(reasoning_parser="gpt_oss", tool_call_parser="gpt_oss").harmony
    assert not ServerConfig(reasoning_parser="qwen3", tool_call_parser="hermes").harmony
    with pytest.raises(ValueError, match="gpt_oss .harmony. parses both"):
        ServerConfig(reasoning_parser="gpt_oss", tool_call_parser="hermes")


def test_auto_tool_choice_is_accepted_with_harmony():
    body = SimpleNamespace(tools=[SimpleNamespace(function=SimpleNamespace(name="get_weather", parameters=None),
                                                  model_dump=lambda **_: {"type": "function"})],
                           tool_choice=None, parallel_tool_calls=True)
    assert ToolPlan.of(body, "gpt_oss").mode == "auto"
