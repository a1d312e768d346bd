"""Bad input: clear exceptions, nothing leaked."""

import json

import pytest

from tests.workers.engine.helpers import GREEDY, assert_all_blocks_free, make_engine
from workers.engine.model_runner import UnsupportedModelError
from workers.protocol import InvalidRequestError, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, scheduling):
    return make_engine(tiny_checkpoint("llama"), num_kv_blocks=32, blocks_per_segment=16)


@pytest.mark.parametrize("prompt, sampling, match", [
    ([], GREEDY, "empty"),
    (list(range(1, 10)) * 60, GREEDY, "context"),  # 540 tokens > 512 max_position_embeddings
    ([1, 2, 3], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2, 3], SamplingParams(max_tokens=-5), "max_tokens"),
    ([1, 2, 3], SamplingParams(temperature=-1.0), "temperature"),
    ([1, 2, 3], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2, 3], SamplingParams(stop=("",)), "stop"),
    ([1, 2, 3], SamplingParams(presence_penalty=2.5), "presence_penalty"),
    ([1, 2, 3], SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
    ([1, 2, 3], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    ([1, 2, 3], SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
    ([1, 2, 3], SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
    ([1, 2, 3], SamplingParams(logit_bias=((5, 101.0),)), "logit_bias values"),
    ([1, 2, 3], SamplingParams(logit_bias=((5, 1.0), (5, 2.0))), "logit_bias keys"),
    ([1, 2, 3], SamplingParams(logit_bias=((10**7, 1.0),)), "logit_bias token ids"),
    ([1, 2, 3], SamplingParams(prompt_logprobs=21), "prompt_logprobs"),
    ([1, 2, 3], SamplingParams(prompt_logprobs=-1), "prompt_logprobs"),
    ([1, 2, 3], SamplingParams(prompt_logprobs=True), "prompt_logprobs"),
    ([1, 2, 3], SamplingParams(priority=2**31), "priority"),
    ([1, 2, 3], SamplingParams(priority=-2**31 - 1), "priority"),
    ([1, 2, 3], SamplingParams(priority=1.5), "priority"),
    ([1, 2, 3], SamplingParams(priority=True), "priority"),
    ([1, 99999], GREEDY, "token ids"),
    ([1, -1], GREEDY, "token ids"),
])
def test_rejected_with_clear_error(engine, prompt, sampling, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request("bad", prompt, sampling)
    assert "bad" not in engine.requests
    assert_all_blocks_free(engine)


def test_prompt_larger_than_kv_capacity(engine):
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        engine.add_request("big", list(range(1, 200)), GREEDY)  # 50 blocks > 32
    assert_all_blocks_free(engine)


def test_duplicate_request_id(engine):
    engine.add_request("dup", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequestError, match="duplicate"):
        engine.add_request("dup", [1, 2, 3], GREEDY)
    engine.abort("dup")
    assert_all_blocks_free(engine)


def test_unknown_architecture(tmp_path, tiny_checkpoint):
    src = tiny_checkpoint("llama")
    cfg = json.loads(open(f"{src}/config.json").read())
    cfg["model_type"] = "no-such-arch"
    cfg["architectures"] = ["NoSuchArchForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="no-such-arch"):
        make_engine(str(tmp_path))


def test_known_unsupported_architecture(tmp_path):
    from transformers import DeepseekV3Config

    DeepseekV3Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, vocab_size=64, n_routed_experts=4,
                     num_experts_per_tok=2, first_k_dense_replace=1).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="multi-head latent attention"):
        make_engine(str(tmp_path))


def test_missing_model_dir():
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        make_engine("/nonexistent/model")


def test_weights_that_cannot_fit_are_refused_before_loading(tmp_path, tiny_checkpoint):
    """A checkpoint whose weights exceed the host's memory (the tiny llama's config with ~1.5 TiB of
    parameters: the check builds the model on the meta device, so nothing that big is made or
    read) is refused at once with the sizes, not loaded until the worker is killed for memory."""
    import shutil

    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "huge")
    cfg = json.loads((tmp_path / "huge" / "config.json").read_text())
    cfg.update(hidden_size=65536, intermediate_size=4 * 65536, num_hidden_layers=8)
    (tmp_path / "huge" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"weights take 15\d\d\.\d GiB as float32, more than the .* GiB "
                                                    r"host memory available"):
        make_engine(str(tmp_path / "huge"))


def test_weight_bytes_counts_what_the_engine_loads(tiny_checkpoint):
    """The estimate is the loaded model's own parameter bytes (tied weights once), in each dtype."""
    import torch

    from workers.engine.model_runner import load_hf_config, weight_bytes

    engine = make_engine(tiny_checkpoint("qwen3"))
    loaded = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    config = load_hf_config(tiny_checkpoint("qwen3"))
    assert weight_bytes(config, torch.float32) == loaded == 2 * weight_bytes(config, torch.bfloat16)
