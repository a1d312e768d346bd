"""Greedy output of the engine is token-identical to transformers' generate (fp32)."""

import pytest

from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, hf_greedy, make_engine, run_all
from tests.tiny_models import FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def family_ref(request, tiny_checkpoint):
    model_dir = tiny_checkpoint(request.param)
    ref = {f"r{i}": hf_greedy(model_dir, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
    return model_dir, ref


@pytest.mark.parametrize("budget", [64, 5], ids=["whole-prefill", "chunked-prefill-5"])
def test_batch_matches_generate(family_ref, budget):
    model_dir, ref = family_ref
    engine = make_engine(model_dir, max_num_batched_tokens=budget, max_num_seqs=5)
    assert run_all(engine, PROMPTS) == ref
    assert_all_blocks_free(engine)


def test_prefix_cache_hits_match_generate(family_ref):
    model_dir, _ = family_ref
    engine = make_engine(model_dir)
    shared = list(range(40, 70))  # 30 tokens: 7 full blocks of 4
    first = run_all(engine, [shared + [1, 2]], prefix="a")
    second = run_all(engine, [shared + [3, 4, 5]], prefix="b")
    assert engine.stats().prompt_tokens_hit >= 28  # 7 blocks reused by the second request
    assert first["a0"] == hf_greedy(model_dir, shared + [1, 2], GREEDY.max_tokens)
    assert second["b0"] == hf_greedy(model_dir, shared + [3, 4, 5], GREEDY.max_tokens)
    assert_all_blocks_free(engine)


def test_preemption_matches_generate(family_ref):
    model_dir, ref = family_ref
    # 12 blocks of 4 tokens cannot hold all five requests at once: the scheduler must preempt
    engine = make_engine(model_dir, num_kv_blocks=12, blocks_per_segment=4, max_num_seqs=5)
    assert run_all(engine, PROMPTS) == ref
    assert engine.stats().num_preemptions > 0
    assert_all_blocks_free(engine)
