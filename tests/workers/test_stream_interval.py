"""The decode worker's automatic stream interval (pure logic; the serving path with a fixed interval
is tests/serving/endpoint/test_openai_endpoint.py::test_stream_interval_sends_tokens_in_chunks)."""

from workers.decode_worker import AUTO_STREAMS_PER_TOKEN, auto_stream_interval


def test_one_token_per_message_until_many_streams():
    assert [auto_stream_interval(n) for n in (0, 1, AUTO_STREAMS_PER_TOKEN - 1)] == [1, 1, 1]
    assert auto_stream_interval(AUTO_STREAMS_PER_TOKEN) == 2
    assert auto_stream_interval(4 * AUTO_STREAMS_PER_TOKEN + 3) == 5
