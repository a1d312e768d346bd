"""Tool calling through the endpoint with the official openai client (real cluster: etcd, Ray,
NIXL, 1 prefill + 1 decode worker, tiny llama; server.tool_call_parser: hermes).

A named tool_choice and "required" constrain the output to the tools' schemas, so even a random
model makes well-formed calls: their arguments parse and follow the schema, streamed or not.
"auto" parses the model's own <tool_call> blocks (hermes): the tiny model is made to write one by
a guided_choice (what a model trained for tools writes by itself), and the endpoint turns it into
tool_calls. The tools reach the chat template, and earlier calls and tool results in the history
are rendered by it."""

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_OUTPUT = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n' \
                '</tool_call>'


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, tiny_checkpoint):
    c = pdserve_cluster(tiny_checkpoint("llama"), prefix="tools", server__tool_call_parser="hermes")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, cluster, stream=False, **kwargs):
    args = dict(model=cluster.config.model.served_model_name, messages=ASK, max_tokens=150, temperature=0,
                tools=TOOLS) | kwargs
    if not stream:
        return client.chat.completions.create(**args)
    return streamed(client.chat.completions.create(stream=True, **args))


def streamed(chunks):
    """(content, calls as [{id, name, arguments}], finish_reason) accumulated as a client does."""
    content, calls, finish = "", {}, None
    for c in chunks:
        if not c.choices:
            continue
        ch = c.choices[0]
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or ():
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            if tc.function is not None:
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
        finish = ch.finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


def as_dicts(message):
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or ()]


def assert_valid_calls(calls):
    assert calls
    for c in calls:
        assert c["id"].startswith("call_") and c["name"] in SCHEMAS
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_named_tool_choice_gets_that_call(client, cluster):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, cluster, tool_choice=named)
    choice = r.choices[0]
    assert choice.message.content is None and choice.finish_reason == "stop"
    calls = as_dicts(choice.message)
    assert [c["name"] for c in calls] == ["get_weather"]
    assert_valid_calls(calls)
    content, streamed_calls, finish = chat(client, cluster, stream=True, tool_choice=named)
    assert content is None and finish == "stop"
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == [(c["name"], c["arguments"]) for c in calls]


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gets_calls_that_follow_their_schemas(client, cluster, parallel):
    """A random model given an open array of calls may not close it within max_tokens: with
    parallel calls, a bias toward tokens with "]" makes it close the list when the grammar lets it."""
    from transformers import AutoTokenizer

    kwargs = dict(tool_choice="required", parallel_tool_calls=parallel, temperature=1.0, seed=3, max_tokens=300)
    if parallel:
        tok = AutoTokenizer.from_pretrained(cluster.config.model.path)
        kwargs["logit_bias"] = {str(i): 8 for i in range(len(tok)) if "]" in tok.decode([i])}
    r = chat(client, cluster, **kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    calls = as_dicts(choice.message)
    assert_valid_calls(calls)
    if not parallel:
        assert len(calls) == 1
    content, streamed_calls, finish = chat(client, cluster, stream=True, **kwargs)
    assert (content, finish) == (None, "tool_calls")
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == [(c["name"], c["arguments"]) for c in calls]


def test_auto_parses_the_models_tool_call_blocks(client, cluster):
    forced = {"extra_body": {"guided_choice": [HERMES_OUTPUT]}}
    r = chat(client, cluster, **forced)
    choice = r.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("Let me look.", "tool_calls")
    calls = as_dicts(choice.message)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"})]
    content, streamed_calls, finish = chat(client, cluster, stream=True, **forced)
    assert (content, finish) == ("Let me look.", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == [(c["name"], c["arguments"]) for c in calls]
    # no call in the text: a plain answer; a malformed block stays text
    for text in ["Sunny in Paris.", "<tool_call>{not json}</tool_call>"]:
        r = chat(client, cluster, extra_body={"guided_choice": [text]})
        assert (r.choices[0].message.content, r.choices[0].message.tool_calls, r.choices[0].finish_reason) == \
            (text, None, "stop")
        assert chat(client, cluster, stream=True, extra_body={"guided_choice": [text]}) == (text, [], "stop")


def test_history_with_calls_and_results_and_tool_choice_none(client, cluster):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    r = chat(client, cluster, messages=history, tool_choice="none", max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens > chat(client, cluster, tool_choice="none", max_tokens=5).usage.prompt_tokens


@pytest.mark.parametrize("kwargs, param, says", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "not among the tools"),
    (dict(tools=None, tool_choice="required"), "tool_choice", "tool_choice needs tools"),
    (dict(tools=TOOLS + TOOLS[:1]), "tools", "distinct"),
    (dict(tool_choice="required", response_format={"type": "json_object"}), "response_format", "forced tool call"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), None, "name"),
])
def test_tool_mistakes_are_400(client, cluster, kwargs, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, cluster, **kwargs)
    assert says in e.value.body["message"], e.value.body
    if param is not None:
        assert e.value.body["param"] == param


def test_the_template_gets_the_tools_and_the_calls(tiny_checkpoint):
    """What chat_prompt hands a tool-aware template (the tiny model's own one ignores tools)."""
    from transformers import AutoTokenizer

    from router.openai_models import ChatCompletionRequest
    from router.request_parsing import chat_prompt
    from router.tool_calls import ToolPlan

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    tok.chat_template = ("{% for t in tools %}TOOL {{ t['function']['name'] }} {{ t['function']['parameters'] | tojson }}\n"
                         "{% endfor %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% for c in m.get('tool_calls', []) %} CALL {{ c['function']['name'] }}"
                         "({{ c['function']['arguments']['city'] }}){% endfor %}\n{% endfor %}")
    body = ChatCompletionRequest(model="m", tools=TOOLS, tool_choice="required", messages=ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]}])
    text = tok.decode(chat_prompt(tok, body, ToolPlan.of(body, None).template_tools))
    assert f"TOOL get_weather {json.dumps(WEATHER)}" in text and "TOOL get_time" in text
    assert "assistant:  CALL get_weather(Oslo)" in text
