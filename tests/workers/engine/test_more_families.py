"""Families beyond the four of test_equivalence.py run token-identical to transformers' generate
(fp32, CPU): each brings something the four lack (MORE_FAMILIES in tests/tiny_models.py: already
fused projections, per-layer windows, multipliers, post-norms, experts, partial rotary, learned
positions, layers without RoPE). The engine has no code of its own per family: these pin that its
paged attention, KV layout, RoPE tables, chunked prefill, preemption, prefix cache and fused
projections serve each."""

import json
import shutil

import pytest
import torch

from tests.tiny_models import MORE_FAMILIES
from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, hf_greedy, make_engine, run_all
from workers.engine.model_runner import TESTED_MODEL_TYPES, UnsupportedModelError


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_family_matches_generate(family, tiny_checkpoint):
    model_dir = tiny_checkpoint(family)
    ref = {f"r{i}": hf_greedy(model_dir, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}

    whole = make_engine(model_dir)
    assert whole.runner.hf_config.model_type == family
    assert run_all(whole, PROMPTS) == ref
    # prefix cache: 7 full blocks of the first request's prompt serve the second's
    shared = list(range(40, 70))
    run_all(whole, [shared + [1, 2]], prefix="a")
    second = run_all(whole, [shared + [3, 4, 5]], prefix="b")
    assert whole.stats().prompt_tokens_hit >= 28
    assert second["b0"] == hf_greedy(model_dir, shared + [3, 4, 5], GREEDY.max_tokens)
    assert_all_blocks_free(whole)

    # 5-token chunks of prefill, and 12 blocks of 4 tokens for five requests: preemption
    tight = make_engine(model_dir, max_num_batched_tokens=5, max_num_seqs=5, num_kv_blocks=12, blocks_per_segment=4)
    assert run_all(tight, PROMPTS) == ref
    assert tight.stats().num_preemptions > 0
    assert_all_blocks_free(tight)

    # q|k|v and gate|up each as one GEMM (engine.fuse_projections, auto on CUDA): the same tokens;
    # checkpoints that ship them fused already have nothing to fuse, which fuse_projections: true refuses
    if family in ("phi3", "gpt2"):
        with pytest.raises(UnsupportedModelError, match="no q/k/v or gate/up Linear groups to fuse"):
            make_engine(model_dir, fuse_projections=True)
    else:
        fused = make_engine(model_dir, fuse_projections=True)
        assert fused.runner.fused_groups > 0
        assert run_all(fused, PROMPTS) == ref


def test_tested_families_are_the_ones_tested():
    """The engine's list of families tested token-exact (it warns at load for any other) is the
    families these tests build."""
    from tests.tiny_models import FAMILIES

    assert set(TESTED_MODEL_TYPES) == set(FAMILIES) | set(MORE_FAMILIES)


def test_mxfp4_gpt_oss_is_dequantized_at_load(tiny_checkpoint, tmp_path, caplog):
    """gpt-oss as released: the experts' weights in MXFP4 (4-bit values, a power-of-two scale per
    32). The engine dequantizes them to its dtype at load, says so, and then serves the model
    token-identical to transformers' generate on the same checkpoint."""
    from tests.tiny_models import build_mxfp4_checkpoint

    model_dir, decoded = build_mxfp4_checkpoint(tiny_checkpoint("gpt_oss"), tmp_path / "tiny-gpt-oss-mxfp4")
    with caplog.at_level("WARNING", logger="workers.engine.model_runner"):
        engine = make_engine(str(model_dir))
    assert "MXFP4 expert weights are dequantized to torch.float32" in caplog.text
    params = dict(engine.runner.model.named_parameters())
    for name, values in decoded.items():  # the 4-bit values times their scales, not the original weights
        assert params[name].dtype == torch.float32 and torch.equal(params[name].detach(), values), name
    original = make_engine(tiny_checkpoint("gpt_oss")).runner.model.state_dict()
    assert not torch.equal(original[name], values)
    ref = {f"r{i}": hf_greedy(str(model_dir), p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
    assert run_all(engine, PROMPTS) == ref
    assert_all_blocks_free(engine)
    # transformers 5.17 (the GPU image's) dequantizes to bf16 whatever the dtype: the engine casts
    # them back, exactly (the 4-bit values times powers of two are bf16 numbers)
    from workers.engine.model_runner import mxfp4_to_dtype

    model = engine.runner.model
    for name in decoded:
        model.get_parameter(name).data = model.get_parameter(name).data.bfloat16()
    assert mxfp4_to_dtype(model, torch.float32) == len(decoded)
    assert all(torch.equal(model.get_parameter(n).detach(), v) for n, v in decoded.items())


@pytest.mark.parametrize("method", ["gptq", "fp8", "bitsandbytes"])
def test_other_quantized_checkpoints_are_refused(tiny_checkpoint, tmp_path, method):
    """Quantized checkpoints other than MXFP4 would run transformers' quantized modules under the
    engine's fused kernels, which read plain weights: refused at load, with the method named."""
    model_dir = tmp_path / f"tiny-{method}"
    shutil.copytree(tiny_checkpoint("llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=f"quant_method '{method}'.*unquantized checkpoint"):
        make_engine(str(model_dir))
