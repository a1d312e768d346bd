"""Tool calling and the Responses API through the endpoint with the official openai client (real
cluster: etcd, Ray, NIXL, 1 prefill + 1 decode worker, tiny llama; server.tool_call_parser: hermes,
server.reasoning_parser: qwen3).

A named tool_choice and "required" constrain the output to the tools' schemas, so even a random
model makes well-formed calls: their arguments parse and follow the schema, streamed or not.
"auto" parses the model's own <tool_call> blocks (hermes): the tiny model is made to write one by
a guided_choice (what a model trained for tools writes by itself), and the endpoint turns it into
tool_calls. The tools reach the chat template, and earlier calls and tool results in the history
are rendered by it.

A thinking model's <think>...</think> (forced by a guided_choice here) comes back apart from the
answer: chat's reasoning_content, the Responses API's reasoning item, streamed or not.

The Responses API (client.responses) runs on the chat path: the same text as the chat request it
means, whole and as its event stream; function calls as function_call items; text.format as a
JSON schema; what it cannot do (stored responses, non-text input) is a 400."""

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
    c = pdserve_cluster(tiny_checkpoint("llama"), prefix="tools", server__tool_call_parser="hermes",
                        server__reasoning_parser="qwen3")
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


# -- the Responses API -----------------------------------------------------------------------------
def responses_events(client, cluster, **kwargs):
    stream = client.responses.create(model=cluster.config.model.served_model_name, stream=True, **kwargs)
    return list(stream)


def test_responses_text_equals_the_chat_answer_whole_and_streamed(client, cluster):
    model = cluster.config.model.served_model_name
    kwargs = dict(instructions="Be brief.", input="What is the weather in Paris?", max_output_tokens=8,
                  temperature=0)
    r = client.responses.create(model=model, **kwargs)
    chat = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather in Paris?"}])
    assert r.output_text == chat.choices[0].message.content and r.output_text
    assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")  # 8 tokens, cut
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, 8)
    assert r.id.startswith("resp_") and r.output[0].type == "message" and r.output[0].role == "assistant"
    events = responses_events(client, cluster, **kwargs)
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"], types
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"], types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text and events[-1].response.usage.output_tokens == 8


def test_responses_function_calls_and_their_outputs(client, cluster):
    tools = [{"type": "function", "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}]
    kwargs = dict(input="What is the weather in Paris?", tools=tools, max_output_tokens=150, temperature=0,
                  tool_choice={"type": "function", "name": "get_weather"})
    r = client.responses.create(model=cluster.config.model.served_model_name, **kwargs)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and r.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    events = responses_events(client, cluster, **kwargs)
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert pieces == done.arguments == call.arguments and events[-1].type == "response.completed"
    # the call and its output go back as input items: the model sees them (a longer prompt)
    turn = [{"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}]
    again = client.responses.create(model=cluster.config.model.served_model_name, input=turn, tools=tools,
                                    tool_choice="none", max_output_tokens=4, temperature=0)
    assert again.output[0].type == "message" and again.usage.input_tokens > r.usage.input_tokens


def test_responses_text_format_json_schema(client, cluster):
    r = client.responses.create(model=cluster.config.model.served_model_name, input="the weather, as JSON",
                                max_output_tokens=150, temperature=0,
                                text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), WEATHER)


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(input="hi", previous_response_id="resp_123"), 400, "previous_response_id"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]), 400, None),
    (dict(input="hi", model="no-such-model"), 404, "model"),
    (dict(input="hi", tool_choice="required"), 400, "tool_choice"),
])
def test_responses_mistakes(client, cluster, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        client.responses.create(**({"model": cluster.config.model.served_model_name, "max_output_tokens": 4} | kwargs))
    assert e.value.status_code == status and e.value.body["type"] == "invalid_request_error", e.value.body
    if param is not None:
        assert e.value.body["param"] == param, e.value.body


# -- reasoning (server.reasoning_parser) -------------------------------------------------------------
THOUGHT = "<think>\nThe user asks about Paris.\n</think>\n\n"


def test_reasoning_comes_apart_from_the_answer_and_the_calls(client, cluster):
    forced = {"extra_body": {"guided_choice": [THOUGHT + "Sunny in Paris."]}, "tool_choice": "none"}
    r = chat(client, cluster, **forced)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == ("\nThe user asks about Paris.\n", "Sunny in Paris.")
    thought, text = "", ""
    for c in client.chat.completions.create(model=cluster.config.model.served_model_name, messages=ASK, max_tokens=150,
                                            temperature=0, stream=True, tools=TOOLS, **forced):
        if c.choices:
            thought += getattr(c.choices[0].delta, "reasoning_content", None) or ""
            text += c.choices[0].delta.content or ""
    assert (thought, text) == (message.reasoning_content, message.content)
    # auto tool choice: the call is parsed from the answer, after the reasoning
    r = chat(client, cluster, extra_body={"guided_choice": [THOUGHT + HERMES_OUTPUT]})
    message = r.choices[0].message
    assert message.reasoning_content == "\nThe user asks about Paris.\n" and message.content == "Let me look."
    assert [c.function.name for c in message.tool_calls] == ["get_weather"] and r.choices[0].finish_reason == "tool_calls"


def test_responses_reasoning_item(client, cluster):
    kwargs = dict(input="What is the weather in Paris?", max_output_tokens=150, temperature=0,
                  extra_body={"structured_outputs": {"choice": [THOUGHT + "Sunny in Paris."]}})
    r = client.responses.create(model=cluster.config.model.served_model_name, **kwargs)
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "Sunny in Paris."
    assert r.output[0].content[0].text == "\nThe user asks about Paris.\n"
    events = responses_events(client, cluster, **kwargs)
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == r.output[0].content[0].text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Sunny in Paris."
    assert [o.type for o in events[-1].response.output] == ["reasoning", "message"]
