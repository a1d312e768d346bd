"""EngineStats.num_pending_prefill_tokens (reported to the router as WorkerLoad's): the prompt
tokens an engine still has to compute, through a chunked prefill, into decoding, and for a
prefill-only request until its handle is pinned. A real engine on a tiny model."""

from workers.protocol import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def pending(engine) -> int:
    return engine.stats().num_pending_prefill_tokens


def test_pending_tokens_follow_a_chunked_prefill_into_decoding(engine):
    assert pending(engine) == 0
    engine.add_request("a", list(range(10, 110)), GREEDY)  # 100 tokens, 64 a step
    engine.add_request("b", list(range(200, 230)), GREEDY)  # 30 tokens, queued behind a (no shared prefix)
    assert pending(engine) == 130  # both waiting: whole prompts
    engine.step()  # a: [0, 64) computed; b waits (no budget left)
    assert pending(engine) == 36 + 30
    engine.step()  # a: [64, 100) + its first token; b: 28 of its 30 tokens (budget 64 - 36)
    assert pending(engine) == 2
    engine.step()  # b's prompt done; a decodes
    assert pending(engine) == 0
    while engine.has_work():
        engine.step()
    assert pending(engine) == 0


def test_a_prefill_only_request_leaves_the_count_when_pinned(engine):
    engine.add_request("p", list(range(300, 340)), GREEDY, prefill_only=True)
    assert pending(engine) == 40
    out = engine.step()
    assert len(out.handles) == 1 and pending(engine) == 0
    engine.release_handle("p")
