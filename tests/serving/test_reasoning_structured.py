"""Structured output with a thinking model through the endpoint (real cluster: etcd, Ray, NIXL,
1 prefill + 1 decode worker; server.reasoning_parser: qwen3) and the official openai client. The
tiny llama here has a thinking model's tokenizer: <think> and </think> are tokens of their own and
the chat template opens the reasoning (the prompt ends with <think>, as DeepSeek-R1's does).

A response_format holds on the answer only: the reasoning before </think> is free text (the random
model is pushed towards </think> by a logit_bias), the answer follows the JSON schema, and the two
come back apart (reasoning_content, content), streamed or not. The first token is sampled on the
prefill worker and the rest on the decode worker: both keep the reasoning free."""

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.tiny_models import build_tiny_checkpoint

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}, "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}


@pytest.fixture(scope="module")
def think_model(tiny_checkpoint):
    return str(build_tiny_checkpoint("llama", Path(tiny_checkpoint("llama")).parent / "tiny-llama-think", think=True))


@pytest.fixture(scope="module")
def cluster(pdserve_cluster, think_model):
    c = pdserve_cluster(think_model, prefix="think", server__reasoning_parser="qwen3")
    yield c
    c.stop()


def test_the_schema_holds_on_the_answer_and_the_reasoning_stays_free(cluster, think_model):
    from transformers import AutoTokenizer

    end = AutoTokenizer.from_pretrained(think_model).convert_tokens_to_ids("</think>")
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    args = dict(model=cluster.config.model.served_model_name, messages=[{"role": "user", "content": "Weather?"}],
                max_tokens=300, temperature=1.0, seed=3, logit_bias={str(end): 4},
                response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    r = client.chat.completions.create(**args)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(message.content), SCHEMA)
    assert message.reasoning_content and "{" not in message.reasoning_content[:1]  # free text, not the JSON
    thought = text = ""
    for chunk in client.chat.completions.create(stream=True, **args):
        if chunk.choices:
            thought += getattr(chunk.choices[0].delta, "reasoning_content", None) or ""
            text += chunk.choices[0].delta.content or ""
    assert (thought, text) == (message.reasoning_content, message.content)
