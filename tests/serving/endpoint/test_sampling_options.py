"""vLLM-style sampling options through the endpoint, on the package's cluster (conftest.py):
logit_bias, min_tokens, min_p, each with the 400 its bad values get."""

import openai
import pytest

from tests.serving.endpoint.conftest import PROMPTS, model_name
from tests.workers.engine.helpers import hf_greedy


def test_logit_bias(client, cluster, tokenizer):
    """+100 on one token: every output token is that one (both endpoints); keys that are not token
    ids, ids past the vocabulary and biases out of [-100, 100] are 400s naming logit_bias."""
    t = tokenizer(" Paris").input_ids[-1]
    r = client.completions.create(model=model_name(cluster), prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                  logit_bias={str(t): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tokenizer.decode([t] * 5)
    c = client.chat.completions.create(model=model_name(cluster), messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=3, temperature=0.8, logit_bias={str(t): 100},
                                       extra_body={"ignore_eos": True})
    assert c.choices[0].message.content == tokenizer.decode([t] * 3)
    for bad in ({"abc": 1}, {"5": 101}, {str(10**7): 1}, {"5": 1, "05": 2}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model_name(cluster), prompt="hi", max_tokens=2, logit_bias=bad)
        assert "logit_bias" in (e.value.body.get("param") or "") + e.value.body["message"], e.value.body


def test_min_tokens(client, cluster, model_dir, tokenizer):
    """vLLM's min_tokens through the endpoint: the greedy 2nd token as a stop token ends a request
    at 2 tokens, but not before min_tokens; min_tokens over max_tokens is a 400."""
    ids = tokenizer(PROMPTS[0]).input_ids
    second = hf_greedy(model_dir, ids, 2)[1]
    kwargs = dict(model=model_name(cluster), prompt=ids, max_tokens=6, temperature=0, logprobs=0)
    plain = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "stop_token_ids": [second]})
    held = client.completions.create(**kwargs, extra_body={"ignore_eos": True, "stop_token_ids": [second],
                                                           "min_tokens": 4})
    assert len(plain.choices[0].logprobs.tokens) == 2 and plain.choices[0].finish_reason == "stop"
    assert len(held.choices[0].logprobs.tokens) >= 4
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name(cluster), prompt="hi", max_tokens=2, extra_body={"min_tokens": 3})
    assert e.value.body["param"] == "min_tokens"


def test_min_p(client, cluster):
    """vLLM's min_p through the endpoint: at 1 only the most likely token survives, so a seeded
    sample at temperature 1 is the greedy output; outside [0, 1] a 400 naming it."""
    kwargs = dict(model=model_name(cluster), prompt=PROMPTS[0], max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kwargs).choices[0].text
    sampled = client.completions.create(temperature=1.0, seed=3, **kwargs).choices[0].text
    kwargs["extra_body"] = kwargs["extra_body"] | {"min_p": 1.0}
    assert sampled != greedy  # the seed really samples
    assert client.completions.create(temperature=1.0, seed=3, **kwargs).choices[0].text == greedy
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(temperature=1.0, **(kwargs | {"extra_body": {"min_p": 1.5}}))
    assert e.value.body["param"] == "min_p", e.value.body
