"""Fused q|k|v and gate|up projections (load-time module surgery): same logits as transformers'
own modules (to fp32 rounding), token-identical greedy output, fewer and larger weights."""

import pytest
import torch

from tests.tiny_models import FAMILIES
from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, hf_greedy, hf_model, make_engine, run_all
from workers.engine.fused_projections import FusedSlice, fuse_projections


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_engine_matches_generate(tiny_checkpoint, family):
    model_dir = tiny_checkpoint(family)
    engine = make_engine(model_dir, fuse_projections=True, max_num_batched_tokens=16)
    slices = [m for m in engine.runner.model.modules() if isinstance(m, FusedSlice)]
    assert len(slices) == 5 * engine.runner.num_layers  # q, k, v, gate, up per layer
    assert run_all(engine, PROMPTS) == {f"r{i}": hf_greedy(model_dir, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
    assert_all_blocks_free(engine)


def test_fused_module_logits_close_and_weights_replaced(tiny_checkpoint):
    import copy

    model = hf_model(tiny_checkpoint("qwen2"))  # qwen2: q/k/v carry biases
    fused = copy.deepcopy(model)
    before = sum(p.numel() for p in fused.parameters())
    assert fuse_projections(fused) == 2 * model.config.num_hidden_layers
    assert sum(p.numel() for p in fused.parameters()) == before  # same weights, regrouped
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n, _ in fused.named_parameters())
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_member_called_out_of_order_raises(tiny_checkpoint):
    import copy

    fused = copy.deepcopy(hf_model(tiny_checkpoint("llama")))
    fuse_projections(fused)
    attn = fused.model.layers[0].self_attn
    with pytest.raises(RuntimeError, match="call order"):
        attn.k_proj(torch.zeros(1, 2, fused.config.hidden_size))
