"""The small-batch decode step as a handful of our own Triton kernels (``engine.fused_decode``, issue 8).

A batch-1 decode step reads every weight once and is bound by that: ~2.47 GB for the Llama-3.2-1B
shape. Through transformers' modules (compiled, cuBLAS) a layer is ~10 kernels, and the small
q|k|v and o GEMMs cost a fixed ~6 µs each whatever their bytes. Here a layer is five launches:

    norm + q|k|v GEMV (+ bias) + RoPE  ->  KV write + attention (the backend's own decode kernel)
    ->  o GEMV + residual  ->  norm + gate|up GEMV + SiLU*mul  ->  down GEMV + residual

(Qwen3's per-head q/k norms come before RoPE: its rotation is a kernel of its own after the GEMV.)

then the final norm + lm_head GEMV. Each GEMV program owns a few rows of W, reads them once and
applies them to every row of the batch (engine.fused_decode_max_batch rows; 1 by default: the
modules' cuBLAS graph is as fast at 2 rows and faster from 8, and tensor-core kernels for 2-32 rows
lost to it by 2-2.5x on an H200 in two builds, benchmarks/README.md); the RMSNorm before a
projection is recomputed by every program from the input row (a few KiB). On sm_90+ the kernels
run under programmatic dependent launch (fused_decode_kernels.py): a GEMV's weights are in flight
while the kernel before it (the attention, the previous GEMV's tail) still runs, and the attention
loads its cached K/V while the q|k|v GEMV runs. benchmarks/pdl_probe.py measured the stand-in on
one H200: 0.71-0.86 ms a step against 1.40-1.57 ms through torch ops.

The weights are the model's own tensors (no copy): the fused q|k|v and gate|up groups of
fused_projections.py when present, else the separate Linears (one GEMV each). Families: those
whose decoder layer is LlamaDecoderLayer-shaped (FAMILIES below: Llama, Mistral, Qwen2 with
q|k|v bias, Qwen3 with q/k norms), SiLU MLP, RoPE over the whole head from a RopeTable
(engine.rope_table). ``supported()`` says why a model is not.
"""

from __future__ import annotations

import logging

import torch
import triton
from torch import nn

from workers.engine.fused_projections import FusedSlice
from workers.engine.rope_table import RopeTable

log = logging.getLogger(__name__)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# (outputs per program, warps) of a GEMV by its kind: input length <= 4096, longer, the lm_head;
# the best of seven sets profile_decode.py --fused-tiles swept on one H200 (0.881 ms a batch-1 step,
# the others 0.889-0.920)
TILES = {"small_k": (4, 4), "large_k": (2, 8), "lm_head": (4, 4)}
MAX_BLOCK_K = 8192  # a program's first weight chunk (held in registers across the PDL wait)


def _weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return linear.weight, linear.bias


def _group(module: nn.Module, names: tuple[str, ...]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """The weights computing ``names`` (fused: one [sum, K] weight; else one per Linear)."""
    first = getattr(module, names[0])
    if isinstance(first, FusedSlice):
        return [_weight(first.group)]
    return [_weight(getattr(module, n)) for n in names]


def supported(model: nn.Module, model_type: str) -> str | None:
    """None if the fused decode step can run ``model``, else why not."""
    if model_type not in FAMILIES:
        return f"model type {model_type!r} (fused decode knows {', '.join(FAMILIES)})"
    config = model.config.get_text_config()
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return f"activation {getattr(config, 'hidden_act', None)!r} (fused decode computes SiLU)"
    rope = getattr(model.model, "rotary_emb", None)
    if not isinstance(rope, RopeTable):
        return "RoPE not from a table (set engine.rope_table: true; dynamic/longrope RoPE is computed per forward)"
    head_dim = model.model.layers[0].self_attn.head_dim
    if rope.cos.shape[-1] != head_dim or head_dim & (head_dim - 1):
        return f"RoPE over {rope.cos.shape[-1]} of {head_dim} head dims (fused decode rotates whole power-of-2 heads)"
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return f"{type(mlp).__name__} is not a gate/up/down MLP"
        projections = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if not all(isinstance(m, (nn.Linear, FusedSlice)) for m in projections):
            return f"{type(attn).__name__}'s projections are not Linear layers"
        extra = {n for n, _ in layer.named_children()} - {"self_attn", "mlp", "input_layernorm",
                                                         "post_attention_layernorm"}
        if extra:
            return f"{type(layer).__name__} has other parts ({', '.join(sorted(extra))})"
    if getattr(config, "final_logit_softcapping", None):
        return "logit soft-capping"
    return None


class FusedDecode:
    """Callable(ids [1, B], pos [1, B]) -> fp32 logits [B, vocab], B <= max_batch, for
    DecodeGraphs (captured and replayed like the model's forward; same backend buffers)."""

    def __init__(self, model: nn.Module, backend, max_batch: int, pdl: bool | None = None):
        self.model, self.backend, self.max_batch = model, backend, max_batch
        inner = model.model
        config = model.config.get_text_config()
        self.embed = inner.embed_tokens
        rope: RopeTable = inner.rotary_emb
        self.cos, self.sin = rope.cos, rope.sin
        attn0 = inner.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.hq = config.num_attention_heads
        self.hkv = getattr(config, "num_key_value_heads", None) or self.hq
        self.layers = []
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
            gate_up = _group(mlp, ("gate_proj", "up_proj"))
            if len(gate_up) == 1:  # fused [2I, K]: gate rows, then up rows
                w, b = gate_up[0]
                inter = w.shape[0] // 2
                gate_up = [(w[:inter], None if b is None else b[:inter]), (w[inter:], None if b is None else b[inter:])]
            self.layers.append(dict(
                layer=i, n1=layer.input_layernorm, qkv=_group(attn, ("q_proj", "k_proj", "v_proj")),
                o=_weight(attn.o_proj), n2=layer.post_attention_layernorm, gate=gate_up[0], up=gate_up[1],
                down=_weight(mlp.down_proj), q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                scaling=attn.scaling, window=window or None))
        self.norm = inner.norm
        self.lm_head = model.get_output_embeddings().weight
        dev = self.lm_head.device
        self.interpret = dev.type != "cuda"
        # PDL needs sm_90+ (Hopper); elsewhere the same kernels run with plain stream order
        self.pdl = (not self.interpret and torch.cuda.get_device_capability(dev)[0] >= 9) if pdl is None else pdl
        self.qkv_width = (self.hq + 2 * self.hkv) * self.head_dim
        # read at capture: a captured graph keeps its launches
        self.tiles = dict(TILES)
        self.num_calls = 0

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.num_calls += 1
        rows = ids.shape[1]
        if rows > self.max_batch:
            raise ValueError(f"fused decode runs <= {self.max_batch} rows, got {rows}")
        # the attention under PDL too (the o GEMV launches and loads W meanwhile), during this call only
        self.backend.decode_pdl = self.pdl
        try:
            return self._step(ids[0], pos[0])
        finally:
            self.backend.decode_pdl = False

    def _step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        rows = ids.shape[0]
        x = self.embed(ids)  # [B, hidden], the residual stream (updated in place)
        qkv = x.new_empty(rows, self.qkv_width)
        hq_d = self.hq * self.head_dim
        for lw in self.layers:
            if lw["q_norm"] is None:  # RoPE in the q|k GEMV's epilogue
                self._project(x, lw["qkv"], qkv, lw["n1"], pos)
            else:  # per-head norms (if any) and RoPE: a kernel of its own over whole heads
                self._project(x, lw["qkv"], qkv, lw["n1"], None)
                self._rope(qkv, pos, lw["q_norm"], lw["k_norm"])
            q = qkv[:, :hq_d].view(1, rows, self.hq, self.head_dim).transpose(1, 2)
            k = qkv[:, hq_d:hq_d + self.hkv * self.head_dim].view(1, rows, self.hkv, self.head_dim).transpose(1, 2)
            v = qkv[:, hq_d + self.hkv * self.head_dim:].view(1, rows, self.hkv, self.head_dim).transpose(1, 2)
            out = self.backend._forward(lw["layer"], q, k, v, lw["scaling"], lw["window"])  # [1, B, Hq, D]
            self._gemv(out.view(rows, hq_d), *lw["o"], x, residual=x)
            act = x.new_empty(rows, lw["gate"][0].shape[0])
            self._gemv(x, *lw["gate"], act, norm=lw["n2"], glu=lw["up"])
            self._gemv(act, *lw["down"], x, residual=x)
        logits = torch.empty(rows, self.lm_head.shape[0], dtype=torch.float32, device=x.device)
        self._gemv(x, self.lm_head, None, logits, norm=self.norm, tile=self.tiles["lm_head"])
        return logits

    def _project(self, x, weights, out, norm, pos):
        """q|k|v into ``out``'s columns, one GEMV per weight of the group; with ``pos``, the q and k
        columns (whole heads, the first (Hq + Hkv) * D) come out rotated."""
        rotated = (self.hq + self.hkv) * self.head_dim if pos is not None else 0
        col = 0
        for w, b in weights:
            lo, hi = col, col + w.shape[0]
            split = min(max(rotated, lo), hi) - lo  # this weight's first ``split`` rows are rotated
            for a, z, rope in ((0, split, True), (split, hi - lo, False)):
                if z > a:
                    self._gemv(x, w[a:z], None if b is None else b[a:z], out[:, lo + a:lo + z], norm=norm,
                               rope=pos if rope else None)
            col = hi

    def _gemv(self, x, w, b, y, norm=None, glu=None, residual=None, rope=None, tile=None):
        """y = (residual +) W . norm?(x) (+ b) over x's rows, with the GLU / RoPE epilogues."""
        from workers.engine.fused_decode_kernels import fused_gemv_kernel

        n, k = w.shape
        w2, b2 = glu if glu is not None else (w, b)
        if rope is not None:
            n //= 2  # (r, r + D/2) pairs of each head
        block_n, warps = tile or self.tiles["small_k" if k <= 4096 else "large_k"]
        block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
        if self.interpret:
            block_n, block_k = max(block_n, 16), min(block_k, 64)  # few programs and chunks for the interpreter
        # absent pointers are stand-ins the kernel's flags leave unread
        fused_gemv_kernel[(triton.cdiv(n, block_n),)](
            x, x.stride(0), w, w if b is None else b, w2, w2 if b2 is None else b2, y, y.stride(0),
            y if residual is None else residual, 0 if residual is None else residual.stride(0),
            w if norm is None else norm.weight, self.cos if rope is None else rope, self.cos, self.sin,
            self.cos.stride(0), n, float(norm.variance_epsilon) if norm is not None else 0.0, M=x.shape[0], K=k,
            BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm is not None, GLU=glu is not None, ROPE=rope is not None,
            HALF=self.head_dim // 2 if rope is not None else 1, RESIDUAL=residual is not None,
            HAS_BIAS=b is not None, PDL=self.pdl, num_warps=warps, **({"launch_pdl": True} if self.pdl else {}))

    def _rope(self, qkv, pos, q_norm, k_norm):
        from workers.engine.fused_decode_kernels import rope_kernel

        launch = {"launch_pdl": True} if self.pdl else {}
        head_norm = q_norm is not None
        rope_kernel[(qkv.shape[0], self.hq + self.hkv)](
            qkv, qkv.stride(0), pos, self.cos, self.sin, self.cos.stride(0),
            q_norm.weight if head_norm else qkv, k_norm.weight if head_norm else qkv,
            float(q_norm.variance_epsilon) if head_norm else 0.0, self.hq, HALF=self.head_dim // 2,
            HEAD_NORM=head_norm, PDL=self.pdl, num_warps=1, **launch)


def build(model: nn.Module, model_type: str, backend, max_batch: int, setting) -> FusedDecode | None:
    """engine.fused_decode for the decode graphs (CUDA): True (an unsupported model is an error),
    'auto' (on where supported, else off with the reason logged), False."""
    if setting is False:
        return None
    why = supported(model, model_type)
    if why is not None:
        if setting is True:
            raise ValueError(f"engine.fused_decode: {why}; set engine.fused_decode: false")
        log.info("fused decode off: %s", why)
        return None
    fused = FusedDecode(model, backend, max_batch)
    log.info("fused decode step for batch sizes <= %d (programmatic dependent launch: %s)", max_batch, fused.pdl)
    return fused
