"""router/request_parsing.py: penalties from an OpenAI body into SamplingParams, range-checked at
the schema (pydantic: the endpoint answers OpenAI's 400 for it)."""

import pydantic
import pytest

from router.config import LimitsConfig
from router.openai_models import ChatCompletionRequest, CompletionRequest
from router.request_parsing import sampling_params


def parse(cls, **fields):
    extra = {"prompt": "hi"} if cls is CompletionRequest else {"messages": [{"role": "user", "content": "hi"}]}
    return sampling_params(cls(model="m", **extra, **fields), 3, 512, LimitsConfig(), default_max_tokens=16)


@pytest.mark.parametrize("cls", [CompletionRequest, ChatCompletionRequest])
def test_penalties_map_into_sampling_params(cls):
    sp = parse(cls, presence_penalty=-2, frequency_penalty=1.5, repetition_penalty=1.3)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (-2, 1.5, 1.3)
    assert sp.has_penalties
    plain = parse(cls)
    assert (plain.presence_penalty, plain.frequency_penalty, plain.repetition_penalty) == (0, 0, 1)
    assert not plain.has_penalties


@pytest.mark.parametrize("cls", [CompletionRequest, ChatCompletionRequest])
def test_priority_maps_into_sampling_params(cls):
    """vLLM's priority extra rides in SamplingParams (to the decode worker, its prefill call and a
    migration's next worker); 0 when not given."""
    assert parse(cls, priority=-7).priority == -7 and parse(cls).priority == 0


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.01), ("presence_penalty", -3), ("frequency_penalty", 3), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", float("inf")),
    ("priority", 2**31), ("priority", -2**31 - 1), ("priority", 1.5), ("priority", True), ("priority", "3"),
])
def test_out_of_range_is_rejected(field, value):
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest(model="m", prompt="hi", **{field: value})
    assert e.value.errors()[0]["loc"] == (field,)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    """The tiny checkpoints' tokenizer with a template that reads one more variable (as Llama 3's
    reads date_string and Qwen3's enable_thinking)."""
    from transformers import AutoTokenizer

    from tests.tiny_models import CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    tok.chat_template = "{% if today is defined %}<|im_start|>system\nToday is {{ today }}<|im_end|>\n{% endif %}" \
                        + CHAT_TEMPLATE
    return tok


def chat(tokenizer, messages, **fields):
    from router.request_parsing import chat_prompt

    return tokenizer.decode(chat_prompt(tokenizer, ChatCompletionRequest(model="m", messages=messages, **fields)))


def test_chat_template_extras(tokenizer):
    """vLLM's chat extras: chat_template_kwargs reach the template; add_generation_prompt false
    leaves the assistant turn unopened; continue_final_message lets the model go on with the last
    (assistant) message; both at once, or a kwarg that is an argument of the template call
    (tokenize, chat_template, ...), is refused."""
    from workers.protocol import InvalidRequestError

    user = [{"role": "user", "content": "hi"}]
    plain = chat(tokenizer, user)
    assert plain.endswith("<|im_start|>assistant\n") and "Today" not in plain
    assert chat(tokenizer, user, chat_template_kwargs={"today": "29 Nov"}) == \
        "<|im_start|>system\nToday is 29 Nov<|im_end|>\n" + plain
    assert chat(tokenizer, user, add_generation_prompt=False) == plain[:-len("<|im_start|>assistant\n")]
    partial = user + [{"role": "assistant", "content": "The answer is"}]
    assert chat(tokenizer, partial, add_generation_prompt=False, continue_final_message=True) == \
        plain + "The answer is"
    with pytest.raises(pydantic.ValidationError, match="continue_final_message"):
        ChatCompletionRequest(model="m", messages=partial, continue_final_message=True)
    for key in ("tokenize", "chat_template", "messages", "add_generation_prompt"):
        with pytest.raises(InvalidRequestError) as e:
            chat(tokenizer, user, chat_template_kwargs={key: True})
        assert e.value.param == "chat_template_kwargs" and key in e.value.message


def test_up_to_sixteen_stop_sequences():
    """lm-eval-harness's completions requests carry a task's whole `until` list: up to 16 stop
    strings (OpenAI: 4) reach SamplingParams; 17, or an empty one, are refused at the schema."""
    stops = [f"stop-{i}" for i in range(16)]
    assert parse(CompletionRequest, stop=stops).stop == tuple(stops)
    for bad in (stops + ["one more"], ["ok", ""]):
        with pytest.raises(pydantic.ValidationError) as e:
            CompletionRequest(model="m", prompt="hi", stop=bad)
        assert e.value.errors()[0]["loc"] == ("stop",)
