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


@pytest.mark.parametrize("fuse", [False, True])
def test_l2_prefetch_ahead_shares_stay_inside_gate_and_up(tiny_checkpoint, fuse):
    """The o GEMV's L2 prefetch of the first gate|up rows (engine.fused_decode_ahead_mib, PDL only): each
    program's share is a whole number of 16-byte lanes, and all programs' shares together stay
    inside the gate and up weights (fused [2I, K] group or separate Linears)."""
    from workers.engine.fused_decode import FusedDecode
    from workers.engine.fused_decode_kernels import AHEAD_LANES

    model = _load(tiny_checkpoint("llama"), fuse=fuse)
    fused = FusedDecode(model, backend=None, max_batch=1, pdl=True)
    lw = fused.layers[0]
    assert fused._ahead(lw) is None  # off by default
    fused.tiles["ahead"] = (1,)
    # a bulk prefetch wants 16-byte aligned addresses: a weight that is not (a CPU load may give
    # 8-byte alignment; CUDA allocations are 256-byte aligned) is not prefetched
    lw["gate"] = (torch.empty(lw["gate"][0].numel() + 2)[2:].view_as(lw["gate"][0]), None)
    assert lw["gate"][0].data_ptr() % 16 and fused._ahead(lw) is None and fused._ahead_refused  # logged
    lw["gate"], lw["up"] = ((torch.randn(lw[n][0].shape), None) for n in ("gate", "up"))  # fresh: aligned
    for mib in (1, 1024):
        fused.tiles["ahead"] = (mib,)
        gate, up, share = fused._ahead(lw)
        n, k = lw["o"][0].shape
        programs = -(-n // fused.tiles["small_k" if k <= 4096 else "large_k"][0])
        assert share > 0 and share % (16 * AHEAD_LANES.value) == 0
        for t in (gate, up):
            assert t.is_contiguous() and programs * share <= min(mib * 2 ** 19, t.numel() * t.element_size())
    fused.pdl = False
    assert fused._ahead(lw) is None  # the prefetch runs while waiting on the kernel before: PDL only
