"""The engine's per-layer hook (layer-wise KV export) and layer-wise streaming between two real
engines in two processes over NIXL: chunked prefill on A, each layer WRITten into B's blocks as
A's forward pass finishes it, decode on B. Greedy tokens equal the colocated engine's and every
block is back in its pool on both sides."""

from __future__ import annotations

import pytest

import tests.kv_transfer.engine_peer as engine_peer_module
from tests.kv_transfer.test_engine_transfer import assert_all_free
from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, make_engine, run_all


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama")


def test_hook_fires_per_layer_in_the_step_that_completes_the_prompt(model_dir):
    """A 30-token prompt in chunks of 8 tokens (4 steps): the factory runs once, in the last step,
    with the prompt's final block ids; the hook sees layers 0..L-1 in order; and when hook(L) runs,
    layer L of EVERY block (also those written by earlier chunks) already holds its final bytes."""
    engine = make_engine(model_dir, max_num_batched_tokens=8)
    prompt = PROMPTS[2]
    calls, snapshots, steps = [], {}, []

    def factory(block_ids):
        calls.append((len(steps), block_ids))

        def hook(layer, wait_written):
            wait_written()
            snapshots[layer] = engine.kv_cache.read_blocks(list(block_ids))[layer].clone()

        return hook

    engine.add_request("r", prompt, GREEDY, prefill_only=True, on_layer_done=factory)
    while True:
        out = engine.step()
        steps.append(out)
        if out.handles:
            break
    (handle,) = out.handles
    assert len(steps) == 4, "the prompt was not chunked"
    assert calls == [(3, handle.block_ids)]
    assert list(snapshots) == list(range(engine.layout.num_layers))
    final = engine.kv_cache.read_blocks(list(handle.block_ids))
    for layer, snap in snapshots.items():
        assert snap.equal(final[layer]), f"layer {layer} was not complete when its hook ran"
    assert engine.release_handle("r")
    assert_all_blocks_free(engine)


def test_a_failing_hook_fails_only_its_request(model_dir):
    engine = make_engine(model_dir)

    def bad_factory(block_ids):
        def hook(layer, wait_written):
            if layer == 1:
                raise RuntimeError("writer gone")

        return hook

    engine.add_request("bad", PROMPTS[0], GREEDY, prefill_only=True, on_layer_done=bad_factory)
    engine.add_request("good", PROMPTS[1], GREEDY)
    out = engine.step()
    assert not out.handles
    (failed,) = [d for d in out.deltas if d.request_id == "bad"]
    assert failed.finish_reason.value == "error" and "failed at layer 1" in failed.error
    rest = {"good": [t for d in out.deltas if d.request_id == "good" for t in d.token_ids]}
    from tests.workers.engine.helpers import drain

    drain(engine, rest)
    assert rest["good"] == run_all(make_engine(model_dir), [PROMPTS[1]])["r0"]
    assert_all_blocks_free(engine)


@pytest.fixture(scope="module")
def layerwise_pair(ray_cluster, model_dir):
    """(prefill actor A with 8-token chunks, decode actor B with another blocks_per_segment)."""
    ray = ray_cluster
    ray.cloudpickle.register_pickle_by_value(engine_peer_module)
    cls = ray.remote(engine_peer_module.EnginePeer).options(
        num_cpus=0, runtime_env={"env_vars": {"UCX_NET_DEVICES": "lo", "OMP_NUM_THREADS": "1"}})
    a = cls.remote(model_dir, "A-layerwise", max_num_batched_tokens=8)
    b = cls.remote(model_dir, "B-layerwise", blocks_per_segment=8)
    yield a, b
    for actor in (a, b):
        ray.kill(actor)


def test_layerwise_prefill_on_a_decode_on_b_matches_colocated(layerwise_pair, ray_cluster, model_dir):
    ray = ray_cluster
    a, b = layerwise_pair
    colocated = run_all(make_engine(model_dir), PROMPTS)
    b_info = ray.get(b.peer_info.remote())
    out, num_steps = {}, []
    for i, prompt in enumerate(PROMPTS):
        rid = f"r{i}"
        target = ray.get(b.reserve_layerwise.remote(rid, prompt, GREEDY))
        handle, steps = ray.get(a.prefill_layerwise.remote(rid, prompt, GREEDY, target, b_info))
        num_steps.append(steps)
        out[rid] = ray.get(b.receive_and_commit.remote(handle, len(target.block_ids)))
    assert out == colocated
    assert max(num_steps) > 1, "no prompt was chunked"
    assert_all_free(ray.get(a.blocks_in_use.remote()))
    assert_all_free(ray.get(b.blocks_in_use.remote()))
