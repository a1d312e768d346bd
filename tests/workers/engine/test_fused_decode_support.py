"""engine.fused_decode's model check (workers/engine/fused_decode.py): which loaded models its
kernels can run, and what a user is told when they cannot. The kernels themselves run in
triton_interpret_cases.py (interpreter) and benchmarks/gpu_check.py (CUDA)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.engine.fused_decode import build, supported
from workers.engine.fused_projections import fuse_projections
from workers.engine.rope_table import use_rope_tables

pytestmark = pytest.mark.parametrize("scheduling", ["once"])  # no engine here: one run, not one per mode


def _load(model_dir: str, rope_table: bool = True, fuse: bool = False):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if rope_table:
        use_rope_tables(model, 128, model.dtype)
    if fuse:
        fuse_projections(model)
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_tested_families_are_supported(tiny_checkpoint, family):
    assert supported(_load(tiny_checkpoint(family)), family) is None
    assert supported(_load(tiny_checkpoint(family), fuse=True), family) is None


def test_unsupported_models_say_why(tiny_checkpoint):
    d = tiny_checkpoint("llama")
    assert "model type 'gemma'" in supported(_load(d), "gemma")
    assert "engine.rope_table" in supported(_load(d, rope_table=False), "llama")
    model = _load(d)
    model.config.hidden_act = "gelu"
    assert "activation 'gelu'" in supported(model, "llama")
    model = _load(d)
    model.model.layers[1].extra_norm = torch.nn.LayerNorm(64)  # a part the kernels would not run
    assert "extra_norm" in supported(model, "llama")


def test_build_follows_the_setting(tiny_checkpoint):
    model = _load(tiny_checkpoint("llama"), rope_table=False)
    assert build(model, "llama", None, 1, False) is None
    assert build(model, "llama", None, 1, "auto") is None  # unsupported: off, the reason logged
    with pytest.raises(ValueError, match="engine.fused_decode: RoPE not from a table.*set engine.fused_decode: false"):
        build(model, "llama", None, 1, True)
    fused = build(_load(tiny_checkpoint("llama")), "llama", None, 2, "auto")
    assert fused is not None and fused.max_batch == 2 and not fused.pdl  # PDL only on sm_90+ CUDA devices
