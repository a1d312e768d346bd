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


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.01), ("presence_penalty", -3), ("frequency_penalty", 3), ("frequency_penalty", float("nan")),
    ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", float("inf")),
])
def test_out_of_range_is_rejected(field, value):
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest(model="m", prompt="hi", **{field: value})
    assert e.value.errors()[0]["loc"] == (field,)
