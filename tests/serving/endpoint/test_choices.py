"""n choices and batched prompts through the endpoint (router/fanout.py end to end): choice
p * n + i answers prompt p, seeded choices differ and repeat, greedy ones are generate's output,
streamed chunks carry their index, and a client that drops an n-choice stream leaves nothing
running."""

import httpx
import openai
import pytest

from tests.serving.endpoint.conftest import PROMPTS, model_name
from tests.workers.engine.helpers import hf_greedy


def test_n_choices_seeded_and_greedy(client, cluster, model_dir, tokenizer):
    """n choices: each its own request in the cluster. Seeded: choice i samples with seed + i, so
    the same request gives the same choices and the choices differ; usage counts the prompt once
    and every choice's tokens. Greedy: every choice is generate's output."""
    kwargs = dict(model=model_name(cluster), prompt=PROMPTS[1], max_tokens=8, extra_body={"ignore_eos": True})
    a = client.completions.create(n=3, temperature=1.0, seed=7, **kwargs)
    b = client.completions.create(n=3, temperature=1.0, seed=7, **kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1, [c.text for c in a.choices]
    one = client.completions.create(n=1, temperature=1.0, seed=7, **kwargs)
    assert one.choices[0].text == a.choices[0].text  # choice 0 is the n=1 request
    ids = tokenizer(PROMPTS[1]).input_ids
    assert a.usage.prompt_tokens == len(ids) and a.usage.completion_tokens == 3 * 8
    want = tokenizer.decode(hf_greedy(model_dir, ids, 8), skip_special_tokens=True)
    greedy = client.completions.create(n=2, temperature=0, **kwargs)
    assert [c.text for c in greedy.choices] == [want, want]


def test_batched_prompts(client, cluster, model_dir, tokenizer):
    """Several prompts in one completions request (strings, or lists of token ids as lm-eval
    sends): choice p * n + i answers prompt p, each greedy choice is generate's output for its own
    prompt, a seeded choice is what the prompt gives alone, usage counts each prompt once; streamed,
    each index gets its prompt's text. An empty prompt in the batch, or prompts x n over the
    concurrency limit, is a 400 naming the prompt."""
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    want = [tokenizer.decode(hf_greedy(model_dir, i, 5), skip_special_tokens=True) for i in ids]
    kwargs = dict(model=model_name(cluster), max_tokens=5, extra_body={"ignore_eos": True})
    by_text = client.completions.create(prompt=PROMPTS, temperature=0, n=2, **kwargs)
    assert [c.index for c in by_text.choices] == list(range(6))
    assert [c.text for c in by_text.choices] == [w for w in want for _ in range(2)]
    assert by_text.usage.prompt_tokens == sum(map(len, ids)) and by_text.usage.completion_tokens == 6 * 5
    by_ids = client.completions.create(prompt=ids, temperature=0, logprobs=1, **kwargs)
    assert [c.text for c in by_ids.choices] == want
    assert all(len(c.logprobs.token_logprobs) == 5 for c in by_ids.choices)
    seeded = client.completions.create(prompt=PROMPTS[:2], temperature=1.0, seed=3, **kwargs)
    alone = client.completions.create(prompt=PROMPTS[1], temperature=1.0, seed=3, **kwargs)
    assert seeded.choices[1].text == alone.choices[0].text
    texts = {}
    for chunk in client.completions.create(prompt=ids, temperature=0, stream=True, **kwargs):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert texts == dict(enumerate(want))
    for bad in ([PROMPTS[0], ""], [ids[0], []]):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(prompt=bad, temperature=0, **kwargs)
        assert e.value.body["param"] == "prompt" and "prompt[1]" in e.value.body["message"], e.value.body
    limit = cluster.config.limits.max_concurrent_requests
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(prompt=[PROMPTS[0]] * (limit // 128 + 1), n=128, temperature=0, **kwargs)
    assert e.value.body["param"] == "prompt" and "concurrent" in e.value.body["message"], e.value.body


def test_n_choices_stream_by_index(client, cluster):
    """Streamed chat with n=2: each choice's chunks carry its index, each ends with its own
    finish_reason, the texts are the non-streamed ones, and the usage chunk sums both."""
    kwargs = dict(model=model_name(cluster), messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=6,
                  temperature=1.0, seed=11, n=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, finishes, roles = {0: "", 1: ""}, {}, set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            roles |= {ch.index} if ch.delta.role == "assistant" else set()
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert roles == {0, 1} and finishes == {0: "length", 1: "length"}
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == 12 == whole.usage.completion_tokens


def test_n_choices_stream_closed_early_leaves_nothing_running(client, cluster):
    """A client that drops an n=3 stream after a few chunks: every choice's request ends at once
    (the endpoint counts none in flight) and no worker keeps KV blocks."""
    from tests.reliability.faults import assert_no_leaks, wait_for

    stream = client.completions.create(model=model_name(cluster), prompt=PROMPTS[2], max_tokens=400, n=3,
                                       temperature=1.0, stream=True, extra_body={"ignore_eos": True})
    seen = set()
    for chunk in stream:
        seen |= {c.index for c in chunk.choices}
        if len(seen) == 3:
            break
    stream.close()

    def inflight():
        return httpx.get(cluster.url + "/v1/routing/recent", timeout=30).json()["inflight_requests"]

    wait_for(lambda: inflight() == 0, 10, "the endpoint to count no request in flight")
    assert_no_leaks(cluster.url, timeout_s=10)
