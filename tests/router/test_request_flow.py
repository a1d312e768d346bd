"""What a migrated request asks of its next decode worker (router/request_flow.py, pure part)."""

from router.request_flow import resumed_sampling
from workers.protocol import SamplingParams


def test_a_resumed_request_asks_for_prompt_logprobs_only_until_the_client_has_them():
    sp = SamplingParams(max_tokens=8, seed=3, prompt_logprobs=2)
    assert resumed_sampling(sp, 0, False) == sp  # moved before its first delta: the same prompt, again
    after = resumed_sampling(sp, 3, True)  # its prompt now ends with 3 generated tokens: none asked
    assert (after.max_tokens, after.output_position_offset, after.prompt_logprobs) == (5, 3, None)
    assert resumed_sampling(after, 2, True) == SamplingParams(max_tokens=3, seed=3, output_position_offset=5)


def test_a_resumed_request_keeps_its_priority():
    assert resumed_sampling(SamplingParams(max_tokens=8, priority=-3), 5, True).priority == -3
