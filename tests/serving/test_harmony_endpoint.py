"""gpt-oss's harmony output through the endpoint (real cluster: etcd, Ray, NIXL, 1 prefill + 1
decode worker; server.reasoning_parser: gpt_oss) with the official openai client. The tiny gpt-oss
here has harmony's tokenizer: <|channel|>, <|message|>, <|end|>, ... are special tokens, <|return|>
and <|call|> end the output, and the template leaves the assistant's header open.

The random model is made to write harmony messages by a guided_choice (what gpt-oss writes by
itself), with a logit_bias towards the special tokens so that the markers come as the special
tokens the real model samples, not as their characters: the endpoint decodes them (the default,
skip_special_tokens, would drop them) and returns the analysis channel as reasoning_content, the
final channel as content and a message to functions.NAME as a tool call, streamed or not; the
Responses API as its reasoning, message and function_call items. No marker reaches the client."""

from pathlib import Path

import openai
import pytest

from tests.tiny_models import HARMONY_TOKENS, build_tiny_checkpoint

ANALYSIS = "<|channel|>analysis<|message|>The user asks about Paris.<|end|>"
FINAL = "<|start|>assistant<|channel|>final<|message|>Sunny in Paris."
CALL = '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def harmony_model(tiny_checkpoint):
    return str(build_tiny_checkpoint("gpt_oss", Path(tiny_checkpoint("gpt_oss")).parent / "tiny-gpt-oss-harmony",
                                     harmony=True))


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, harmony_model):
    c = pdserve_cluster(harmony_model, prefix="harmony", server__reasoning_parser="gpt_oss")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def markers(harmony_model):
    """The markers' token ids, biased so that the forced output takes them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(harmony_model)
    return {str(tok.convert_tokens_to_ids(m)): 30 for m in HARMONY_TOKENS}


def forced(cluster, markers, text, **kwargs):
    return dict(model=cluster.config.model.served_model_name, messages=ASK, max_tokens=120, temperature=0,
                logit_bias=markers, extra_body={"guided_choice": [text]}) | kwargs


def streamed(chunks):
    """(reasoning, content, calls as (name, arguments), finish_reason) as a client adds them up."""
    thought, content, calls, finish = "", "", {}, None
    for c in chunks:
        if not c.choices:
            continue
        ch = c.choices[0]
        thought += getattr(ch.delta, "reasoning_content", None) or ""
        content += ch.delta.content or ""
        for tc in ch.delta.tool_calls or ():
            name, args = calls.get(tc.index, ("", ""))
            calls[tc.index] = (name + (tc.function.name or ""), args + (tc.function.arguments or ""))
        finish = ch.finish_reason or finish
    return thought or None, content or None, [calls[i] for i in sorted(calls)], finish


def test_channels_come_apart_as_reasoning_and_answer(client, cluster, markers, harmony_model):
    from transformers import AutoTokenizer

    args = forced(cluster, markers, ANALYSIS + FINAL, logprobs=True)
    r = client.chat.completions.create(**args)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, m.tool_calls, r.choices[0].finish_reason) == \
        ("The user asks about Paris.", "Sunny in Paris.", None, "stop")
    # the markers came as the special tokens a gpt-oss model samples (one token each)
    assert {t.token for t in r.choices[0].logprobs.content} >= {"<|channel|>", "<|message|>", "<|end|>", "<|start|>"}
    # usage counts the reasoning's tokens (its text tokenized), whole and streamed
    tok = AutoTokenizer.from_pretrained(harmony_model)
    thought_tokens = len(tok("The user asks about Paris.", add_special_tokens=False).input_ids)
    assert r.usage.completion_tokens_details.reasoning_tokens == thought_tokens < r.usage.completion_tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thought_tokens
    assert streamed(chunks) == ("The user asks about Paris.", "Sunny in Paris.", [], "stop")


def test_a_message_to_a_function_is_a_tool_call(client, cluster, markers):
    args = forced(cluster, markers, ANALYSIS + CALL, tools=TOOLS)
    r = client.chat.completions.create(**args)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, r.choices[0].finish_reason) == \
        ("The user asks about Paris.", None, "tool_calls")
    assert [(c.function.name, c.function.arguments) for c in m.tool_calls] == [("get_weather", '{"city": "Paris"}')]
    assert m.tool_calls[0].id.startswith("call_")
    assert streamed(client.chat.completions.create(stream=True, **args)) == \
        ("The user asks about Paris.", None, [("get_weather", '{"city": "Paris"}')], "tool_calls")
    # offered no tools to call (tool_choice none): the call's arguments stay text
    r = client.chat.completions.create(**forced(cluster, markers, ANALYSIS + CALL, tools=TOOLS, tool_choice="none"))
    assert (r.choices[0].message.content, r.choices[0].message.tool_calls) == ('{"city": "Paris"}', None)


def test_responses_items(client, cluster):
    """(The Responses API takes no logit_bias: the markers may come as their characters; the text,
    and so the items, are the same.)"""
    kwargs = dict(model=cluster.config.model.served_model_name, input="What is the weather in Paris?",
                  max_output_tokens=120, temperature=0,
                  extra_body={"structured_outputs": {"choice": [ANALYSIS + FINAL]}})
    r = client.responses.create(**kwargs)
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "Sunny in Paris."
    assert r.output[0].content[0].text == "The user asks about Paris."
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    events = list(client.responses.create(stream=True, **kwargs))
    assert events[-1].response.usage.output_tokens_details.reasoning_tokens == \
        r.usage.output_tokens_details.reasoning_tokens
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == \
        "The user asks about Paris."
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Sunny in Paris."
    with_call = kwargs | {"tools": [{"type": "function", **TOOLS[0]["function"]}],
                          "extra_body": {"structured_outputs": {"choice": [ANALYSIS + CALL]}}}
    streamed_call = list(client.responses.create(stream=True, **with_call))[-1].response
    for r in (client.responses.create(**with_call), streamed_call):
        assert [o.type for o in r.output] == ["reasoning", "function_call"]
        assert (r.output[1].name, r.output[1].arguments) == ("get_weather", '{"city": "Paris"}')


def test_free_output_leaks_no_marker_and_a_constrained_answer_is_plain(client, cluster, markers):
    """The random model unforced, pushed towards the markers: whatever it writes, no marker text
    comes back. A response_format holds from the first token: the answer is its JSON, no reasoning."""
    for seed in range(3):
        r = client.chat.completions.create(model=cluster.config.model.served_model_name, messages=ASK, max_tokens=40,
                                           temperature=1.0, seed=seed, logit_bias={k: 3 for k in markers})
        m = r.choices[0].message
        assert r.usage.completion_tokens > 0
        assert "<|" not in (m.content or "") + (m.reasoning_content or ""), m
    r = client.chat.completions.create(model=cluster.config.model.served_model_name, messages=ASK, max_tokens=60,
                                       temperature=0, response_format={"type": "json_schema", "json_schema": {
                                           "name": "w", "schema": {"enum": ["Paris", "Lyon"]}}})
    assert r.choices[0].message.content in ('"Paris"', '"Lyon"') and r.choices[0].message.reasoning_content is None


def test_reasoning_effort_reaches_the_template(client, cluster, harmony_model):
    """OpenAI's reasoning_effort (the Responses API's reasoning.effort) is the template's
    reasoning_effort, as gpt-oss's template takes it (its system message says 'Reasoning: high')."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(harmony_model)
    model = cluster.config.model.served_model_name
    want = len(tok.apply_chat_template(ASK, add_generation_prompt=True, reasoning_effort="high", tokenize=True,
                                       return_dict=True)["input_ids"])
    plain = client.chat.completions.create(model=model, messages=ASK, max_tokens=1).usage.prompt_tokens
    high = client.chat.completions.create(model=model, messages=ASK, max_tokens=1, reasoning_effort="high")
    assert high.usage.prompt_tokens == want > plain
    r = client.responses.create(model=model, input=ASK[0]["content"], max_output_tokens=1, reasoning={"effort": "high"})
    assert r.usage.input_tokens == want
    for bad, param in [(dict(reasoning_effort="extreme"), "reasoning_effort"),
                       (dict(reasoning_effort="high", extra_body={"chat_template_kwargs": {"reasoning_effort": "low"}}),
                        "reasoning_effort")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=ASK, max_tokens=1, **bad)
        assert e.value.body["type"] == "invalid_request_error" and param in (e.value.body["param"] or ""), e.value.body


def test_the_reasoning_before_a_call_goes_back_to_the_template(client, cluster, markers, harmony_model):
    """A tool loop's next turn: the assistant's call and its reasoning_content as the answer gave
    them, then the tool's result. The template gets the reasoning (gpt-oss's reads it as thinking,
    Qwen3's as reasoning_content) and shows it before the call."""
    from transformers import AutoTokenizer

    r = client.chat.completions.create(**forced(cluster, markers, ANALYSIS + CALL, tools=TOOLS))
    m = r.choices[0].message
    turn = ASK + [m.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": m.tool_calls[0].id,
                                                     "content": "sunny"}]
    tok = AutoTokenizer.from_pretrained(harmony_model)
    for_template = turn[:1] + [dict(turn[1], thinking=m.reasoning_content, tool_calls=[
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])] + turn[2:]
    text = tok.apply_chat_template(for_template, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "analysis<|message|>The user asks about Paris.<|end|>" in text
    want = len(tok(text, add_special_tokens=False).input_ids)
    r = client.chat.completions.create(model=cluster.config.model.served_model_name, messages=turn, tools=TOOLS,
                                       max_tokens=1)
    assert r.usage.prompt_tokens == want
    without = [turn[0], {k: v for k, v in turn[1].items() if k != "reasoning_content"}, turn[2]]
    r = client.chat.completions.create(model=cluster.config.model.served_model_name, messages=without, tools=TOOLS,
                                       max_tokens=1)
    assert r.usage.prompt_tokens < want
    # the Responses API's stateless loop: the answer's output items (reasoning, function_call) sent
    # back with the call's output; the reasoning goes with the call's turn
    tool = {"type": "function", **TOOLS[0]["function"]}
    first = client.responses.create(model=cluster.config.model.served_model_name, input=ASK[0]["content"],
                                    tools=[tool], max_output_tokens=120, temperature=0,
                                    extra_body={"structured_outputs": {"choice": [ANALYSIS + CALL]}})
    assert [o.type for o in first.output] == ["reasoning", "function_call"]
    items = [{"role": "user", "content": ASK[0]["content"]}] + [o.model_dump(exclude_none=True) for o in first.output]
    items.append({"type": "function_call_output", "call_id": first.output[1].call_id, "output": "sunny"})
    r = client.responses.create(model=cluster.config.model.served_model_name, input=items, tools=[tool],
                                max_output_tokens=1)
    assert r.usage.input_tokens == want
