"""Prefill on engine A in one process, NIXL READ, decode on engine B in another: greedy tokens
identical to one engine doing both, for two architectures; every block back in its pool on both
sides afterwards, also after a lease expired before the release."""

from __future__ import annotations

import pytest

import tests.kv_transfer.engine_peer as engine_peer_module
from kv_transfer.errors import LeaseExpiredError
from tests.workers.engine.helpers import GREEDY, PROMPTS, make_engine, run_all


def assert_all_free(usage: dict) -> None:
    assert usage["used"] == 0 and usage["pinned"] == 0 and usage["requests"] == 0 and usage["leased"] == 0, usage
    assert usage["free"] == usage["target"], usage


@pytest.fixture(scope="module")
def engine_pair(ray_cluster, tiny_checkpoint):
    """engine_pair(family) -> (model_dir, prefill actor A, decode actor B), one pair per family for
    the module (B addresses its KV with another blocks_per_segment: same meaning, own layout)."""
    ray = ray_cluster
    ray.cloudpickle.register_pickle_by_value(engine_peer_module)
    pairs, actors = {}, []

    def get(family: str):
        if family not in pairs:
            model_dir = tiny_checkpoint(family)
            cls = ray.remote(engine_peer_module.EnginePeer).options(
                num_cpus=0, runtime_env={"env_vars": {"UCX_NET_DEVICES": "lo", "OMP_NUM_THREADS": "1"}})
            a = cls.remote(model_dir, f"A-{family}")
            b = cls.remote(model_dir, f"B-{family}", blocks_per_segment=8)
            actors.extend([a, b])
            pairs[family] = (model_dir, a, b)
        return pairs[family]

    yield get
    for actor in actors:
        ray.kill(actor)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prefill_on_a_decode_on_b_matches_colocated(family, engine_pair, ray_cluster):
    ray = ray_cluster
    model_dir, a, b = engine_pair(family)
    colocated = run_all(make_engine(model_dir), PROMPTS)
    a_info = ray.get(a.peer_info.remote())
    out = {}
    for i, prompt in enumerate(PROMPTS):  # block_size 4: most prompts end in a partial block
        rid = f"r{i}"
        handle = ray.get(a.prefill.remote(rid, prompt, GREEDY, 30.0))
        assert handle.num_tokens == len(prompt) and handle.expires_at > 0
        ray.get(b.import_kv.remote(handle, prompt, GREEDY, a_info))
        ray.get(a.release.remote(rid))
        out[rid] = ray.get(b.commit_and_decode.remote(handle))
    assert out == colocated
    assert_all_free(ray.get(a.blocks_in_use.remote()))
    assert_all_free(ray.get(b.blocks_in_use.remote()))


def test_lease_expired_before_release_frees_both_sides(engine_pair, ray_cluster):
    """The prefill lease expires before the decode side releases: the release raises
    LeaseExpiredError, the decode side aborts its import, and no block stays held anywhere."""
    ray = ray_cluster
    _, a, b = engine_pair("llama")
    prompt = PROMPTS[2]
    handle = ray.get(a.prefill.remote("late", prompt, GREEDY, 0.05))
    while "late" not in ray.get(a.expired_ids.remote()):
        pass
    ray.get(b.import_kv.remote(handle, prompt, GREEDY, ray.get(a.peer_info.remote())))
    with pytest.raises(LeaseExpiredError):
        ray.get(a.release.remote("late"))
    assert ray.get(b.abort.remote("late"))  # what was read is discarded with the blocks
    assert_all_free(ray.get(a.blocks_in_use.remote()))
    assert_all_free(ray.get(b.blocks_in_use.remote()))
