"""Tiny random-weight checkpoints the tests build (seeded), one per architecture family, with a
small byte-level BPE tokenizer trained on the spot (no hub access needed)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# More families the engine runs through transformers' own modules, each with something FAMILIES
# lack (tests/workers/engine/test_more_families.py; on CUDA: benchmarks/gpu_check.py more-families)
MORE_FAMILIES = ("phi3", "gemma", "gemma3_text", "granite", "olmo2", "mixtral", "qwen3_moe", "phi", "gpt2",
                 "smollm3", "gemma2", "gpt_oss")

_CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Disaggregated serving splits prefill and decode into separate worker pools.",
    "KV blocks move from the prefill worker to the decode worker without serialization.",
    "A quick brown fox jumps over the lazy dog while the router picks a worker.",
    "hello world, hello pdserve! 0123456789 ~!@#$%^&*()_+ {}[]:;\"'<>,.?/",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# a thinking model's template (DeepSeek-R1's habit): the generation prompt opens the reasoning
THINK_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                            "<|im_start|>assistant\n<think>\n{% endif %}")


# gpt-oss's harmony format: its markers are special tokens, <|return|> and <|call|> end the output;
# the template shows the reasoning effort in a system message and the tools in a developer message, and
# leaves the assistant's header open
HARMONY_TOKENS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
HARMONY_CHAT_TEMPLATE = (
    "{% if reasoning_effort %}<|start|>system<|message|>Reasoning: {{ reasoning_effort }}<|end|>{% endif %}"
    "{% if tools %}<|start|>developer<|message|># Tools\n{% for t in tools %}{{ t['function']['name'] }}\n"
    "{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' and m['tool_calls'] %}"
    "{% if m['thinking'] %}<|start|>assistant<|channel|>analysis<|message|>{{ m['thinking'] }}<|end|>{% endif %}"
    "{% for c in m['tool_calls'] %}<|start|>assistant to=functions.{{ c['function']['name'] }}<|channel|>commentary"
    " json<|message|>{{ c['function']['arguments'] | tojson }}<|call|>{% endfor %}"
    "{% elif m['role'] == 'tool' %}<|start|>functions.tool to=assistant<|channel|>commentary<|message|>"
    "{{ m['content'] }}<|end|>"
    "{% else %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


def build_tokenizer(out_dir: Path, vocab_size: int = 384, think: bool = False, harmony: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    if think:  # tokens of their own, but text (not special), as in Qwen3's and DeepSeek-R1's tokenizers
        fast.add_tokens(["<think>", "</think>"])
    fast.chat_template = THINK_CHAT_TEMPLATE if think else CHAT_TEMPLATE
    if harmony:
        fast.add_special_tokens({"additional_special_tokens": HARMONY_TOKENS})
        fast.eos_token, fast.chat_template = "<|return|>", HARMONY_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _config(family: str, vocab_size: int, eos_id: int):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                  initializer_range=0.4, eos_token_id=eos_id, bos_token_id=0, pad_token_id=0,
                  tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=16, head_dim=16)  # window < test lengths: exercised
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    if family == "phi3":  # q|k|v and gate|up already one Linear each in the checkpoint
        return tf.Phi3Config(**common)
    if family == "gemma":  # heads x head_dim != hidden, scaled embeddings, (1 + w) norms, GeLU
        return tf.GemmaConfig(**{**common, "head_dim": 32})
    if family == "gemma2":  # attention logits capped (tanh; low here, so it bites), sliding / global layers
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                               attn_logit_softcapping=2.0, final_logit_softcapping=5.0)
    if family == "gemma3_text":  # per-layer windows (local / global layers), q/k norms, its own scaling
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if family == "granite":  # multipliers on embeddings, residuals, attention scale and logits
        return tf.GraniteConfig(**common, embedding_multiplier=2.0, attention_multiplier=0.3,
                                residual_multiplier=0.5, logits_scaling=4.0)
    if family == "olmo2":  # q/k norms over the whole projection, norms after attention and MLP
        return tf.Olmo2Config(**common)
    if family == "mixtral":  # mixture of experts
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**{**common, "head_dim": 16}, num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32)
    if family == "phi":  # partial rotary, attention and MLP in parallel, biases, LayerNorm
        return tf.PhiConfig(**common, partial_rotary_factor=0.5)
    if family == "gpt2":  # learned absolute positions, Conv1D projections, multi-head (no GQA)
        return tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=512, vocab_size=vocab_size,
                             initializer_range=0.4, eos_token_id=eos_id, bos_token_id=0)
    if family == "gpt_oss":  # attention sinks (a learned logit per head in the softmax), sliding / full
        # layers, biased q/k/v/o, mixture of experts with clamped SwiGLU; YaRN RoPE
        yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32.0,
                    beta_slow=1.0, rope_theta=150000.0, truncate=False)  # 4 x 128 = max_position_embeddings
        return tf.GptOssConfig(**{**common, "intermediate_size": 32}, head_dim=16, sliding_window=8,
                               num_local_experts=4, num_experts_per_tok=2, rope_parameters=yarn)
    if family == "smollm3":  # layers without RoPE (NoPE) between RoPE layers
        return tf.SmolLM3Config(**common, no_rope_layer_interval=2)
    raise ValueError(family)


def build_tiny_checkpoint(family: str, out_dir: str | os.PathLike, seed: int | None = None,
                          think: bool = False, harmony: bool = False) -> Path:
    """Save a seeded random model + tokenizer; returns the directory. Idempotent. ``think``: a
    thinking model's tokenizer (<think> and </think> tokens, a template that opens the reasoning);
    ``harmony``: gpt-oss's (its markers as special tokens, <|return|> and <|call|> as EOS)."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    # built aside and renamed into place: processes that build the same checkpoint at once (the
    # suite and its Triton interpreter processes) never see a half-written one
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tok = build_tokenizer(tmp, think=think, harmony=harmony)
    seed = (FAMILIES + MORE_FAMILIES).index(family) if seed is None else seed
    torch.manual_seed(seed)
    cfg = _config(family, len(tok), tok.convert_tokens_to_ids(tok.eos_token))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = [cfg.eos_token_id, tok.convert_tokens_to_ids("<|call|>")] if harmony \
        else cfg.eos_token_id
    model.save_pretrained(tmp)
    (tmp / "pdserve_test_model.json").write_text(json.dumps({"family": family, "seed": seed}))
    try:
        tmp.rename(out)
    except OSError:  # another process got there first, or a partial directory of an interrupted
        if (out / "config.json").exists() and (out / "tokenizer.json").exists():  # build in place
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out)
            tmp.rename(out)
    return out


# MXFP4's 4-bit values (e2m1), by code: bit 3 is the sign
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An expert weight as gpt-oss's checkpoints store it: ``w`` [experts, in, out] (the model's
    parameter) -> blocks [experts, out, in / 32, 16] (two 4-bit codes a byte, the low nibble first),
    scales [experts, out, in / 32] (a power of two per 32 inputs, as exponent + 127), and the values
    they decode to (shaped as ``w``)."""
    grid = torch.tensor(FP4_VALUES)
    rows = w.transpose(1, 2).reshape(w.shape[0], w.shape[2], w.shape[1] // 32, 32)
    exp = torch.ceil(torch.log2(rows.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-127, 127)
    scaled = rows / torch.exp2(exp)[..., None]
    codes = (scaled[..., None] - grid).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).contiguous()
    values = (grid[codes] * torch.exp2(exp)[..., None]).reshape(w.shape[0], w.shape[2], w.shape[1]).transpose(1, 2)
    return blocks, (exp + 127).to(torch.uint8).contiguous(), values.contiguous()


def build_mxfp4_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of a tiny gpt-oss checkpoint with its experts' weights in MXFP4, laid out and
    configured as the released gpt-oss checkpoints are; returns it and, per expert weight, the
    values its MXFP4 codes decode to."""
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    weights = load_file(out / "model.safetensors")
    decoded = {}
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weights[f"{name}_blocks"], weights[f"{name}_scales"], decoded[name] = quantize_mxfp4(weights.pop(name))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out, decoded
