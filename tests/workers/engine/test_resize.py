"""Runtime KV quota changes: grow, shrink around blocks in use, memory really returned."""

from tests.workers.engine.helpers import PROMPTS, assert_all_blocks_free, make_engine, run_all
from workers.protocol import SamplingParams

LONG = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_shrink_while_running_never_touches_blocks_in_use(tiny_checkpoint):
    model_dir = tiny_checkpoint("llama")
    reference = run_all(make_engine(model_dir, num_kv_blocks=64, blocks_per_segment=8), PROMPTS, LONG)

    engine = make_engine(model_dir, num_kv_blocks=64, blocks_per_segment=8)
    out = {}
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, LONG)
        out[f"r{i}"] = []
    for _ in range(3):
        for d in engine.step().deltas:
            out[d.request_id] += d.token_ids
    in_use_before = {b for r in engine.requests.values() for b in r.block_ids}
    bytes_before = engine.kv_cache.num_bytes
    res = engine.resize(16)  # far below what is allocated: only free segments can go now
    assert res.target_blocks == 16
    assert res.num_usable_blocks == 16
    assert engine.kv_cache.num_bytes < bytes_before  # some memory returned at once
    for r in engine.requests.values():  # blocks in use still addressable
        for b in r.block_ids:
            assert engine.layout.locate(b)[0] in engine.kv_cache.segments
    assert in_use_before <= {b for r in engine.requests.values() for b in r.block_ids}
    while engine.has_work():
        for d in engine.step().deltas:
            out[d.request_id] += d.token_ids
    assert out == reference  # token-identical to an undisturbed run
    engine.step()  # reap
    assert engine.kv_cache.num_blocks == 16  # the rest came back once requests finished
    assert engine.kv_cache.num_bytes == 2 * engine.layout.segment_bytes
    assert_all_blocks_free(engine)

    res = engine.resize(40)  # grow back
    assert res.num_blocks == 40 and res.done
    assert run_all(engine, PROMPTS, LONG, prefix="again") == {k.replace("r", "again"): v for k, v in reference.items()}
    assert_all_blocks_free(engine)


def test_shrink_evicts_cached_blocks_and_emits_events(tiny_checkpoint):
    from workers.protocol import KVEventKind

    engine = make_engine(tiny_checkpoint("llama"), num_kv_blocks=32, blocks_per_segment=8)
    run_all(engine, [list(range(1, 60))], SamplingParams(max_tokens=2, temperature=0))
    engine.take_kv_events()
    assert engine.stats().num_cached_free_blocks > 8
    res = engine.resize(8)
    assert res.done and engine.kv_cache.num_blocks == 8
    assert any(e.kind == KVEventKind.REMOVED for e in engine.take_kv_events())
    assert_all_blocks_free(engine)


def test_grow_cancels_pending_shrink(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"), num_kv_blocks=32, blocks_per_segment=8)
    engine.add_request("r", list(range(1, 100)), LONG)
    engine.step()
    res = engine.resize(8)
    assert res.num_pending_blocks > 0  # the running request keeps its segments alive
    res = engine.resize(32)
    assert res.num_pending_blocks == 0 and res.num_usable_blocks == 32
    while engine.has_work():
        engine.step()
    assert_all_blocks_free(engine)
