"""The small-batch decode step as a handful of our own Triton kernels (``engine.fused_decode``, issue 8).

A batch-1 decode step reads every weight once and is bound by that: ~2.47 GB for the Llama-3.2-1B
shape. Through transformers' modules (compiled, cuBLAS) a layer is ~10 kernels, and the small
q|k|v and o GEMMs cost a fixed ~6 µs each whatever their bytes. Here a layer is five launches:

    norm + q|k|v GEMV (+ bias) + RoPE  ->  KV write + attention (the backend's own decode kernel)
    ->  o GEMV + residual  ->  norm + gate|up GEMV + SiLU*mul  ->  down GEMV + residual

(Qwen3's per-head q/k norms come before RoPE: its rotation is a kernel of its own after the GEMV.)

then the final norm + lm_head GEMV. Each GEMV program owns a few rows of W, reads them once and
applies them to every row of the batch; the RMSNorm before a projection is recomputed by every
program from the input row (a few KiB). Steps of several rows take a tensor-core kernel with the
same fusions (fused_gemm_kernel: W streamed in chunks, each chunk multiplied with all rows at once;
~2x slower than cuBLAS on an H200, so batch 1 is the default). On sm_90+ the kernels run under programmatic
dependent launch (fused_decode_kernels.py): a GEMV's weights are in flight while the kernel
before it (the attention, the previous GEMV's tail) still runs. benchmarks/pdl_probe.py measured
the stand-in on one H200: 0.71-0.86 ms a step against 1.40-1.57 ms through torch ops.

The weights are the model's own tensors (no copy): the fused q|k|v and gate|up groups of
fused_projections.py when present, else the separate Linears (one GEMV each). Families: those
whose decoder layer is LlamaDecoderLayer-shaped (TESTED_MODEL_TYPES: Llama, Mistral, Qwen2 with
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
# tiles["ahead"]: MiB of the gate|up weights (half gate, half up: their first rows, which the first
# wave of the gate|up GEMV's programs reads) that the o GEMV's programs ask L2 for while they wait
# out the attention (PDL only; fused_decode_kernels._prefetch_ahead); engine.fused_decode_ahead_mib,
# 0 = off (profile_decode.py --fused-tiles "ahead=16" sweeps it)
# steps of >= GEMM_FROM rows take fused_gemm_kernel (tensor cores) instead of the GEMV (which
# re-reads and re-normalises its input per row). Tiles: outputs x K chunk (elements of 2 bytes; 128
# bytes at most) x warps x W pipeline stages per program, by the projection's outputs: <= 4096
# ("gemm_small_n": smaller tiles, deeper pipeline, so that o / down / q|k|v still keep enough programs
# and bytes in flight to stream W) or more ("gemm"); "gemm_prefetch": KiB of its W rows each program
# asks L2 for before its PDL wait. The first build (W through registers, no pipeline) ran ~2x slower
# than the modules' cuBLAS graph at 2-32 rows on an H200; this one (W through TMA in a pipeline) is
# not measured yet, so engine.fused_decode_max_batch stays 1
GEMM_FROM = 2
GEMM_TILES = {"gemm": (32, 64, 4, 4), "gemm_small_n": (16, 64, 4, 8), "gemm_prefetch": (32,)}
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

    def __init__(self, model: nn.Module, backend, max_batch: int, pdl: bool | None = None, ahead_mib: int = 0):
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
        self.tiles = dict(TILES, **GEMM_TILES, ahead=(ahead_mib,))
        self._descriptors: dict = {}  # TMA descriptors of the weights, by (address, shape, box)
        self._ahead_refused = False
        self.gemm_from = GEMM_FROM
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
        gemm = rows >= self.gemm_from  # the tensor-core kernel has no RoPE epilogue
        for lw in self.layers:
            if lw["q_norm"] is None and not gemm:  # RoPE in the q|k GEMV's epilogue
                self._project(x, lw["qkv"], qkv, lw["n1"], pos)
            else:  # per-head norms (if any) and RoPE: a kernel of its own over whole heads
                self._project(x, lw["qkv"], qkv, lw["n1"], None)
                self._rope(qkv, pos, lw["q_norm"], lw["k_norm"])
            q = qkv[:, :hq_d].view(1, rows, self.hq, self.head_dim).transpose(1, 2)
            k = qkv[:, hq_d:hq_d + self.hkv * self.head_dim].view(1, rows, self.hkv, self.head_dim).transpose(1, 2)
            v = qkv[:, hq_d + self.hkv * self.head_dim:].view(1, rows, self.hkv, self.head_dim).transpose(1, 2)
            out = self.backend._forward(lw["layer"], q, k, v, lw["scaling"], lw["window"])  # [1, B, Hq, D]
            self._gemv(out.view(rows, hq_d), *lw["o"], x, residual=x, ahead=self._ahead(lw))
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

    def _ahead(self, lw):
        """(gate, up, bytes per o-GEMV program) for the o GEMV's L2 prefetch of the first gate|up rows,
        or None (off, no PDL, or a share under 16 bytes a lane)."""
        mib = self.tiles["ahead"][0]
        if not (self.pdl and mib > 0):
            return None
        gate, up = lw["gate"][0], lw["up"][0]
        from workers.engine.fused_decode_kernels import AHEAD_LANES

        per_region = min(mib * 2 ** 19, gate.numel() * gate.element_size(), up.numel() * up.element_size())
        n, k = lw["o"][0].shape  # the o GEMV's grid, as _gemv launches it
        block_n, _ = self.tiles["small_k" if k <= 4096 else "large_k"]
        programs = triton.cdiv(n, block_n)
        unit = 16 * AHEAD_LANES.value
        share = per_region // programs // unit * unit
        if share == 0 or any(t.data_ptr() % 16 or not t.is_contiguous() for t in (gate, up)):
            if not self._ahead_refused:  # asked for, not possible here: said once, not silently
                self._ahead_refused = True
                log.warning("engine.fused_decode_ahead_mib=%d not applied: %s", mib,
                            "under 16 bytes a lane" if share == 0 else "gate/up weights not 16-byte aligned")
            return None
        return gate, up, share

    def _gemv(self, x, w, b, y, norm=None, glu=None, residual=None, rope=None, tile=None, ahead=None):
        """y = (residual +) W . norm?(x) (+ b) over x's rows, with the GLU / RoPE epilogues; the GEMV
        below gemm_from rows, the tensor-core kernel from there. ``ahead``: (a, b, bytes) for the
        GEMV's L2 prefetch of what the next kernel reads (see _ahead)."""
        from workers.engine.fused_decode_kernels import fused_gemm_kernel, fused_gemv_kernel

        n, k = w.shape
        rows = x.shape[0]
        w2, b2 = glu if glu is not None else (w, b)
        # both kernels' arguments around W (absent pointers are stand-ins their flags leave unread)
        bias, bias2 = (w if b is None else b), (w2 if b2 is None else b2)
        out = (y, y.stride(0), y if residual is None else residual, 0 if residual is None else residual.stride(0),
               w if norm is None else norm.weight)
        eps = float(norm.variance_epsilon) if norm is not None else 0.0
        flags = dict(K=k, NORM=norm is not None, GLU=glu is not None, RESIDUAL=residual is not None,
                     HAS_BIAS=b is not None, PDL=self.pdl, **({"launch_pdl": True} if self.pdl else {}))
        if rows >= self.gemm_from:
            if rope is not None:
                raise ValueError("the tensor-core path rotates after the projection (rope_kernel), not in it")
            block_n, block_k, warps, stages = self.tiles["gemm_small_n" if n <= 4096 else "gemm"]
            (prefetch_kib,) = self.tiles["gemm_prefetch"]
            block_k = min(block_k * 2 // w.element_size(), 128 // w.element_size(), triton.next_power_of_2(k))
            fused_gemm_kernel[(triton.cdiv(n, block_n),)](
                x, x.stride(0), self._descriptor(w, block_n, block_k), bias, self._descriptor(w2, block_n, block_k),
                bias2, *out, w, w2, prefetch_kib * 1024, rows, n, eps, BLOCK_M=max(16, triton.next_power_of_2(rows)),
                BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                DOT_PRECISION="ieee" if w.dtype == torch.float32 else "tf32", num_warps=warps, **flags)
            return
        if rope is not None:
            n //= 2  # (r, r + D/2) pairs of each head
        block_n, warps = tile or self.tiles["small_k" if k <= 4096 else "large_k"]
        block_k = min(triton.next_power_of_2(k), MAX_BLOCK_K)
        if self.interpret:
            block_n, block_k = max(block_n, 16), min(block_k, 64)  # few programs and chunks for the interpreter
        ahead_a, ahead_b, ahead_bytes = ahead if ahead is not None else (w, w, 0)
        fused_gemv_kernel[(triton.cdiv(n, block_n),)](
            x, x.stride(0), w, bias, w2, bias2, *out, self.cos if rope is None else rope, self.cos, self.sin,
            self.cos.stride(0), n, eps, M=rows, BLOCK_N=block_n, BLOCK_K=block_k, ROPE=rope is not None,
            HALF=self.head_dim // 2 if rope is not None else 1, ahead_a=ahead_a, ahead_b=ahead_b,
            ahead_bytes=ahead_bytes, AHEAD=ahead is not None, num_warps=warps, **flags)

    def _descriptor(self, w: torch.Tensor, block_n: int, block_k: int):
        """A TMA descriptor of weight ``w`` ([N, K], rows contiguous) in block_n x block_k boxes
        (rows past N read as zeros), made once per weight and box."""
        from triton.tools.tensor_descriptor import TensorDescriptor

        key = (w.data_ptr(), tuple(w.shape), block_n, block_k)
        desc = self._descriptors.get(key)
        if desc is None:
            if w.data_ptr() % 16 or (w.stride(0) * w.element_size()) % 16:
                if not self.interpret:
                    raise ValueError(f"engine.fused_decode_max_batch >= 2: a weight of shape {tuple(w.shape)} is not "
                                     "16-byte aligned (TMA needs it); set engine.fused_decode_max_batch: 1")
                w = w.clone()  # the interpreter (a CPU load may be 8-byte aligned): an aligned copy, kept below
            desc = self._descriptors[key] = TensorDescriptor.from_tensor(w, [block_n, block_k])
        return desc

    def _rope(self, qkv, pos, q_norm, k_norm):
        from workers.engine.fused_decode_kernels import rope_kernel

        launch = {"launch_pdl": True} if self.pdl else {}
        head_norm = q_norm is not None
        rope_kernel[(qkv.shape[0], self.hq + self.hkv)](
            qkv, qkv.stride(0), pos, self.cos, self.sin, self.cos.stride(0),
            q_norm.weight if head_norm else qkv, k_norm.weight if head_norm else qkv,
            float(q_norm.variance_epsilon) if head_norm else 0.0, self.hq, HALF=self.head_dim // 2,
            HEAD_NORM=head_norm, PDL=self.pdl, num_warps=1, **launch)


def build(model: nn.Module, model_type: str, backend, max_batch: int, setting,
          ahead_mib: int = 0) -> FusedDecode | None:
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
    fused = FusedDecode(model, backend, max_batch, ahead_mib=ahead_mib)
    log.info("fused decode step for batch sizes <= %d (programmatic dependent launch: %s)", max_batch, fused.pdl)
    return fused
