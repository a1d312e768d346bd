"""Loads a Hugging Face checkpoint through transformers' own model classes and runs packed steps
with our paged attention.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from workers.engine.attention import (PAGED_ATTN, AttentionBackend, LayerCallback, SeqSlice, TokenFill,
                                      TorchPagedAttention)
from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.cuda_graphs import DecodeGraphs, capture_sizes
from workers.engine.device_transfer import upload
from workers.engine.fused_projections import fuse_projections
from workers.engine.kv_cache import KVCache
from workers.engine.rope_table import use_rope_tables

log = logging.getLogger(__name__)

# Families tested token-exact against transformers' generate (tests/workers/engine:
# test_equivalence.py, test_more_families.py); any other loads with a warning that says so.
TESTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite",
                      "olmo2", "mixtral", "qwen3_moe", "phi", "gpt2", "smollm3", "gpt_oss")
# Known not to work, and why.
UNSUPPORTED_MODEL_TYPES = {
    "mamba": "not an attention model (state-space layers have no KV cache)",
    "mamba2": "not an attention model (state-space layers have no KV cache)",
    "jamba": "hybrid attention/state-space layers are not supported",
    "falcon_h1": "hybrid attention/state-space layers are not supported",
    "qwen3_next": "linear-attention layers are not supported",
    "deepseek_v3": "multi-head latent attention caches a compressed latent, not per-head K/V",
    "deepseek_v2": "multi-head latent attention caches a compressed latent, not per-head K/V",
    "llama4": "chunked attention and mixed NoPE layers are not implemented",
}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Config fields of models whose logits are not the plain head of the final hidden state (scaled,
# soft-capped): prompt logprobs apply the head themselves (ModelRunner.execute_with_hidden), so
# such models refuse them rather than give other values than the model's.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "logits_soft_cap",
                          "output_multiplier")


class UnsupportedModelError(ValueError):
    pass


def attention_logit_cap(config) -> float | None:
    """Gemma 2's cap on attention scores (cap * tanh(s / cap)), None for models without one."""
    return getattr(config.get_text_config(), "attn_logit_softcapping", None) or None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 is not supported on CPU; use float32 or bfloat16")
    return dtype


def load_hf_config(path: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"cannot load the model config in {path}: {e}") from e
    if config.model_type in UNSUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"model type {config.model_type!r} is not supported: {UNSUPPORTED_MODEL_TYPES[config.model_type]}")
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(f"model type {config.model_type!r} is not a decoder-only causal LM known to transformers")
    return config


def quantized_load_args(config, dtype: torch.dtype) -> dict:
    """from_pretrained's arguments for a quantized checkpoint. MXFP4 (gpt-oss's released
    checkpoints: the experts' weights as 4-bit values with a shared scale per 32) is dequantized to
    the engine's dtype at load, always: transformers would otherwise swap in its own MXFP4 expert
    kernels where the `kernels` package can fetch them (and dequantize where it cannot), so what ran
    would depend on the machine. Any other quantization is refused: the engine's fused
    projections and decode kernels read the modules' weights as plain tensors."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return {}
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    method = str(getattr(method, "value", method))
    if method == "mxfp4":
        from transformers import Mxfp4Config

        log.warning("the checkpoint's MXFP4 expert weights are dequantized to %s at load (pdserve has no MXFP4 "
                    "kernels): its experts take about %dx the checkpoint's bytes for them in memory", dtype,
                    torch.finfo(dtype).bits // 4)
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    raise UnsupportedModelError(f"quantized checkpoints are not supported (quantization_config.quant_method "
                                f"{method!r}): pdserve runs unquantized weights (bfloat16, float16 or float32); "
                                f"serve the unquantized checkpoint of this model")


def weight_bytes(config, dtype: torch.dtype) -> int:
    """The model's parameter bytes in ``dtype`` (MXFP4 experts as the engine dequantizes them), from
    its config alone: the model built on the meta device, which allocates nothing."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_weights_fit(nbytes: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before loading anything, weights that cannot fit where they go: host memory first
    (from_pretrained reads them there), then the GPU's free memory; an error that says so instead
    of a worker killed for memory after minutes of loading."""
    places = [("host memory available", _host_available_bytes())]
    if device.type == "cuda":
        gpu = f"free on {device} ({torch.cuda.get_device_name(device)})"
        places.append((gpu, torch.cuda.mem_get_info(device)[0]))
    for where, free in places:
        if nbytes > free:
            raise UnsupportedModelError(
                f"the model's weights take {nbytes / 2**30:.1f} GiB as {str(dtype).removeprefix('torch.')}, more than "
                f"the {free / 2**30:.1f} GiB {where}: a worker holds its whole model on one device (no tensor "
                f"parallelism); use a smaller model or dtype, or a device with more memory")


def _host_available_bytes() -> int:
    """Linux's MemAvailable (what can be allocated without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def load_causal_lm(path: str, config, dtype: torch.dtype, device: torch.device | None = None, **kwargs):
    """transformers' model of the checkpoint at ``path`` (``config``: its load_hf_config) in
    ``dtype``, on the CPU: a quantized checkpoint refused or dequantized as quantized_load_args
    says (MXFP4 experts cast to ``dtype``); with ``device``, weights that cannot fit there are
    refused before anything is read (check_weights_fit). The engine's model and the tests' and
    gpu_check's references load through here, so they see the same weights."""
    quantized = quantized_load_args(config, dtype)
    if device is not None:
        check_weights_fit(weight_bytes(config, dtype), dtype, device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized, **kwargs)
    if quantized:
        mxfp4_to_dtype(model, dtype)
    return model


def mxfp4_to_dtype(model, dtype: torch.dtype) -> int:
    """Dequantized MXFP4 expert weights in ``dtype``: transformers 5.17 dequantizes them to bf16
    whatever the model's dtype (5.24 to the dtype); the 4-bit values times their power-of-two scales
    are exact in either. Returns how many parameters changed dtype."""
    changed = 0
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and p.dtype != dtype:
            p.data = p.data.to(dtype)
            changed += 1
    return changed


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None when it ships none: the engine then works on token ids
    only (no text in deltas, no stop strings), as a benchmark of token-id workloads needs."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        log.info("no tokenizer in %s: token ids only (no text, no stop strings)", path)
        return None
    return AutoTokenizer.from_pretrained(path)


def model_identity(config) -> str:
    """Architecture identity for KV compatibility: equal configs give equal KV meaning."""
    d = config.to_diff_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset",
              "architectures", "use_cache"):
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return f"{config.model_type}:{hashlib.sha256(blob).hexdigest()[:12]}"


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, model_path: str):
        self.device = resolve_device(model_config.device)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.hf_config = load_hf_config(model_path)
        model_cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[self.hf_config.model_type]
        self.model = load_causal_lm(model_path, self.hf_config, self.dtype, self.device,
                                    attn_implementation=PAGED_ATTN).to(self.device).eval()
        if not type(self.model).is_backend_compatible():
            raise UnsupportedModelError(f"{model_cls_name} does not use transformers' attention interface")
        if self.hf_config.model_type not in TESTED_MODEL_TYPES:
            log.warning("model type %r runs through transformers' own %s but is not among the families tested "
                        "token-identical to transformers' generate (%s): check its output before serving it",
                        self.hf_config.model_type, model_cls_name, ", ".join(TESTED_MODEL_TYPES))
        fuse = engine_config.fuse_projections
        self.fused_groups = 0
        if fuse is True or (fuse == "auto" and self.device.type == "cuda"):
            self.fused_groups = fuse_projections(self.model)
            if self.fused_groups == 0 and fuse is True:
                raise UnsupportedModelError(f"fuse_projections: {model_cls_name} has no q/k/v or gate/up Linear "
                                            f"groups to fuse; set engine.fuse_projections: false")
            log.info("fused %d projection groups (q|k|v, gate|up)", self.fused_groups)
        self.tokenizer = load_tokenizer(model_path)
        self.model_id = model_identity(self.hf_config)
        text_config = self.hf_config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self.max_model_len = engine_config.max_model_len or getattr(text_config, "max_position_embeddings", 2048)
        self.rope_tables = 0
        if engine_config.rope_table:  # a few positions past the limit: a step never indexes off the table
            self.rope_tables = use_rope_tables(self.model, self.max_model_len + 64, self.dtype)
        self.eos_token_ids = self._eos_ids(model_path)
        self.head = self.model.get_output_embeddings()
        transforms = [f for f in LOGIT_TRANSFORM_FIELDS if getattr(text_config, f, None) not in (None, 0, 1)]
        self.prompt_logprobs_unsupported = (f"model type {self.hf_config.model_type!r} transforms its logits "
                                            f"({', '.join(transforms)})" if transforms else None)
        self.engine_config = engine_config
        self.backend: AttentionBackend | None = None
        self.graphs: DecodeGraphs | None = None
        self.gemv_choices: list[dict] = []  # gemv.choose()'s table, when it ran
        self._general = self._forward
        on_cuda = self.device.type == "cuda"
        self.compile_decode = on_cuda and engine_config.compile_decode is not False
        # compile_prefill auto with the torch attention backend: off (compiled steps are built around
        # the Triton backend's fixed-shape metadata; the torch reference builds masks in Python)
        prefill = engine_config.compile_prefill
        if prefill == "auto" and engine_config.attention_backend == "torch":
            prefill = False
        self.compiled_general = on_cuda and prefill is not False
        if self.compiled_general:
            self._general = torch.compile(self._forward, dynamic=True)
        # Steps through a compiled general path are padded to >= 2 tokens and >= 2 logits rows:
        # torch.compile specialises sizes 0 and 1 even with dynamic=True, so a 1-token step or a
        # chunk without logits would otherwise recompile (~30 s) in the middle of serving. Set in
        # bind_kv_cache (needs a backend that pads: Triton).
        self.pad_general = False
        self.general_warmup_s: float | None = None  # warm_up_general()'s seconds, once it ran

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep,
                         pdserve_backend=self.backend)
        return out.logits[0].float()

    def _eos_ids(self, model_path: str) -> frozenset[int]:
        ids: set[int] = set()
        try:
            gen = GenerationConfig.from_pretrained(model_path)
            e = gen.eos_token_id
            ids.update(e if isinstance(e, list) else [e] if e is not None else [])
        except OSError:
            pass
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def bind_kv_cache(self, kv_cache: KVCache, backend: str = "auto") -> None:
        """Choose the attention backend: 'auto' = Triton kernels (+ decode CUDA graphs) on CUDA, the
        torch reference elsewhere. 'triton' off CUDA runs only under TRITON_INTERPRET=1 (tests)."""
        cfg = self.engine_config
        if backend == "torch" or (backend == "auto" and self.device.type != "cuda"):
            self.backend = TorchPagedAttention(kv_cache)
            return
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention_backend 'triton' needs a CUDA device (TRITON_INTERPRET=1 runs it on "
                             "the CPU, slowly, for tests); set engine.attention_backend: torch")
        from workers.engine.triton_attention import TritonPagedAttention

        text_config = self.hf_config.get_text_config()
        self.backend = TritonPagedAttention(
            kv_cache, text_config.num_attention_heads, cfg.max_num_batched_tokens, cfg.max_num_seqs,
            self.max_model_len)
        if self.device.type == "cuda" and cfg.cuda_graphs:
            if cfg.gemv:
                from workers.engine import gemv

                self.gemv_choices = gemv.choose(self.model)
            from workers.engine import fused_decode

            fused = fused_decode.build(self.model, self.hf_config.model_type, self.backend,
                                       min(cfg.fused_decode_max_batch, cfg.max_num_seqs), cfg.fused_decode)
            self.graphs = DecodeGraphs(self.model, self.backend, capture_sizes(cfg.max_num_seqs), self.compile_decode,
                                       cfg.tune_batch1, fused)
            try:
                self.graphs.capture()
            except Exception as e:
                self.graphs = None
                why = f"{type(self.model).__name__}'s decode step cannot be captured as a CUDA graph: {type(e).__name__}: {e}"
                if cfg.cuda_graphs is True:
                    raise UnsupportedModelError(f"{why}; set engine.cuda_graphs: false (or auto) to decode without "
                                                f"CUDA graphs") from e
                torch.cuda.synchronize()
                log.warning("engine.cuda_graphs auto: decoding without CUDA graphs (slower): %s", why)
        if self.compiled_general and min(cfg.max_num_seqs, self.backend.max_tokens) >= 2:
            self.pad_general = True
            self.general_warmup_s = self.warm_up_general()

    @torch.inference_mode()
    def warm_up_general(self) -> float:
        """Run the general (prefill / mixed) step on all-padding inputs (they write no KV and read
        none), at two token counts: with compile_prefill the compiler runs here, at start-up, not
        at the first request; the second count reuses the first's symbolic graph. Seconds taken."""
        t0 = time.perf_counter()
        cap = min(self.engine_config.max_num_seqs, self.backend.max_tokens)
        for size in sorted({min(16, cap), min(48, cap)}):
            ids, pos, keep = self.backend.prepare([], [], [], [0, 1], pad_to=size)
            self._general(ids, pos, keep)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        log.info("general step warmed up (compile_prefill) in %.1f s", took)
        return took

    @torch.inference_mode()
    def execute(self, input_ids: list[int], positions: list[int], seqs: list[SeqSlice],
                logits_indices: list[int], on_layer_written: LayerCallback | None = None,
                fill: TokenFill | None = None) -> torch.Tensor:
        """One packed forward pass, queued: returns fp32 logits [len(logits_indices), vocab] on the
        device without waiting for them. ``on_layer_written`` is called after each layer's KV
        write (see AttentionBackend); such a step runs eagerly, never as a CUDA graph replay (a
        replay runs no Python per layer). ``fill``: input tokens only the device knows yet."""
        if self.graphs is not None and on_layer_written is None and self.graphs.fits(seqs):
            return self.graphs.run(seqs, input_ids, positions, logits_indices, fill)
        ids, pos, keep, n_logits = self._stage(input_ids, positions, seqs, logits_indices, fill)
        if on_layer_written is None:
            return self._general(ids, pos, keep)[:n_logits]
        self.backend.on_layer_written = on_layer_written  # per-layer Python: always eager
        try:
            return self._forward(ids, pos, keep)[:n_logits]
        finally:
            self.backend.on_layer_written = None

    def greedy_ids(self, logits: torch.Tensor) -> torch.Tensor | None:
        """``logits``' greedy argmax [rows] int64 on the device if a decode graph computed it with
        them (execute's return value of a graph step), else None: the sampler takes it for rows
        whose logits nothing changes."""
        return self.graphs.greedy_ids(logits) if self.graphs is not None else None

    @torch.inference_mode()
    def execute_with_hidden(self, input_ids: list[int], positions: list[int], seqs: list[SeqSlice],
                            logits_indices: list[int], hidden_rows: list[int],
                            on_layer_written: LayerCallback | None = None,
                            fill: TokenFill | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """execute(), plus the final hidden states of the packed rows ``hidden_rows`` [len, hidden]
        (prompt logprobs: the caller applies ``head`` to them). Always eager, never a graph replay
        or the compiled general step (those keep the sampled rows only): the decoder, then the head
        on the sampled rows exactly as the model's forward does it. On CUDA with compile_prefill the
        other requests of such a step are computed eagerly too (not bitwise the compiled values)."""
        ids, pos, keep, n_logits = self._stage(input_ids, positions, seqs, logits_indices, fill)
        self.backend.on_layer_written = on_layer_written
        try:
            hidden = self.model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False,
                                              pdserve_backend=self.backend).last_hidden_state
        finally:
            self.backend.on_layer_written = None
        logits = self.head(hidden[:, keep, :])[0].float()[:n_logits]
        return logits, hidden[0].index_select(0, upload(hidden_rows, torch.int64, self.device))

    def _stage(self, input_ids, positions, seqs, logits_indices, fill):
        """The backend's device inputs for a general (not graph) step; n_logits: the real rows."""
        n_logits, pad_to = len(logits_indices), None
        if self.pad_general:  # extra rows: token 0's logits again, then cut off; a padding sequence
            logits_indices = [*logits_indices, *[0] * (2 - n_logits)]
            pad_to = 2 if len(input_ids) < 2 else None
        ids, pos, keep = self.backend.prepare(seqs, input_ids, positions, logits_indices, pad_to=pad_to)
        if fill is not None:
            fill.apply(ids)
        return ids, pos, keep, n_logits
