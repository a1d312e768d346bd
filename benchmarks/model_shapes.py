"""Checkpoints the benchmarks run: the tests' tiny llama (CPU), or a random-weight model
of a real shape with a word-level tokenizer covering its whole vocabulary (token-id workloads need
no real tokenizer, but the endpoint loads one and detokenizes whatever id the model samples).

Speed does not depend on weight values, so random weights measure the real shape's speed.
"""

from __future__ import annotations

from pathlib import Path

# Llama-3.2-1B's shape (the GPU targets)
SHAPES = {
    "llama-1b-shape": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                           head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                           max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    # ~110M parameters: a mid-size model that a 2-core CPU runs in minutes (engine benchmark)
    "small-shape": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                        head_dim=64, intermediate_size=2048, vocab_size=32000, tie_word_embeddings=True,
                        max_position_embeddings=4096),
    # ~10M parameters with the tiny models' 384-token vocabulary: enough compute per token on one
    # CPU core (prefill ~1 ms/token, decode ~10-20 ms/step) that prefill and decode interfere
    "cpu-small-shape": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                            head_dim=64, intermediate_size=1024, vocab_size=384, tie_word_embeddings=False,
                            max_position_embeddings=2048),
    # a mid-size mixture of experts (Mixtral's layout, 8 experts, 2 a token; ~2.4B parameters, 0.7B
    # active): compiled vs uncompiled MoE steps (benchmarks/moe_compile_probe.py)
    "moe-shape": dict(model_type="mixtral", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, intermediate_size=2816, num_local_experts=8,
                      num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=4096, sliding_window=None),
}


def checkpoint(name: str, cache: Path) -> str:
    """Directory of ``name``: 'tiny' (tests/tiny_models.py llama), a SHAPES key, or a path."""
    if name == "tiny":
        from tests.tiny_models import build_tiny_checkpoint

        return str(build_tiny_checkpoint("llama", cache / "tiny-llama"))
    if name not in SHAPES:
        if not Path(name).is_dir():
            raise FileNotFoundError(f"--model {name!r}: not 'tiny', not one of {sorted(SHAPES)}, not a directory")
        return name
    out = cache / name
    if not (out / "tokenizer.json").exists():
        _build_random(SHAPES[name], out)
    return str(out)


def _build_random(shape: dict, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    shape = dict(shape)
    cfg = AutoConfig.for_model(shape.pop("model_type", "llama"), **shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 1B random inits are slow on a CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)
    del model
    # the tokenizer last: its file marks a complete checkpoint
    if shape["vocab_size"] <= 1024:  # the tests' small BPE tokenizer (it has at most 384 tokens)
        from tests.tiny_models import build_tokenizer

        build_tokenizer(out, vocab_size=shape["vocab_size"])
        return
    vocab = {f"<t{i}>": i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<t1>", eos_token="<t2>", pad_token="<t0>",
                            unk_token="<t0>").save_pretrained(out)
