"""Batch-1 projections as a Triton GEMV inside the decode CUDA graphs (issue 8: decode_b1).

At batch 1 a projection is y = W x: each weight byte is read once for two FLOPs, so its time is
the weight's bytes over the memory bandwidth. cuBLAS's M = 1 kernels read the Llama-3.2-1B
weights at ~2.0 TB/s of an H100's ~3.0 TB/s copy rate (benchmarks/README.md). This kernel is the
plain GEMV: each program owns BLOCK_N rows of W, streams them in BLOCK_K-wide tiles and reduces
in fp32. Whether it beats cuBLAS depends on the shape, so the kernel is chosen per weight shape
at load: choose() times cuBLAS and every CONFIGS entry on the model's own weights inside a CUDA
graph (no launch gaps, the layers' weights in turn so L2 holds none of them) and keeps the
fastest (benchmarks/gemv_probe.py prints the same table).

Only inputs of one row take the GEMV (decode at batch 1); every other step keeps F.linear. The
kernel is a custom op, so torch.compile of the decode step keeps it opaque, as it does the
attention op. Layers are switched by setting ``gemv_cfg`` on them (GemvLinear, FusedLinear);
None = F.linear.
"""

from __future__ import annotations

import logging
import os
import statistics
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# (BLOCK_N, BLOCK_K, num_warps): the tiles that led on some Llama-3.2-1B projection in
# benchmarks/gemv_probe.py on one H200 (in a graph, 2026-11-28, tenth session): 2x2048x4 on q|k|v,
# o, down and lm_head (5.3 / 4.4 / 11.3 / 120 us vs cuBLAS 7.2 / 6.5 / 14.4 / 127), 16x256x4 on
# gate|up (18.0 vs 19.1); 4x2048x8 and 8x1024x8 next. (The first H100 set, 8x512 ... 32x256x8,
# never won by more than ~10 %: choose() did not time the wide tiles then.)
CONFIGS: tuple[tuple[int, int, int], ...] = ((2, 2048, 4), (4, 2048, 8), (8, 1024, 8), (16, 256, 4), (8, 512, 4))
Config = tuple[int, int, int]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Config | None) -> torch.Tensor:
    """F.linear, or the GEMV op when a config is set and ``x`` holds one row."""
    if cfg is None or x.numel() != x.shape[-1]:
        return F.linear(x, weight, bias)
    return torch.ops.pdserve.gemv(x, weight, bias, *cfg)


class GemvLinear(nn.Linear):
    """An nn.Linear whose one-row calls may take the GEMV (the class of a loaded Linear is swapped
    to this one in place: same parameters, same state dict)."""

    gemv_cfg: Config | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.gemv_cfg)


def _register_op() -> None:
    """The custom op and its kernel; needs triton (imported here: CPU installs never call this)."""
    if hasattr(torch.ops.pdserve, "gemv"):
        return
    import triton

    from workers.engine.gemv_kernel import gemv_kernel

    interpret = os.environ.get("TRITON_INTERPRET") == "1"

    @torch.library.custom_op("pdserve::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, block_n: int, block_k: int,
             num_warps: int) -> torch.Tensor:
        """y = weight @ x + bias for one row x [..., K] (fp32 accumulation, x's dtype out)."""
        n, k = weight.shape
        if weight.stride(1) != 1 or not x.is_contiguous():
            raise ValueError("gemv needs a row-major weight and a contiguous input")
        y = x.new_empty((*x.shape[:-1], n))
        gemv_kernel[(triton.cdiv(n, block_n),)](
            x, weight, bias if bias is not None else weight, y, n, k, weight.stride(0), HAS_BIAS=bias is not None,
            BLOCK_N=block_n, BLOCK_K=block_k, INTERPRET=interpret, num_warps=num_warps)
        return y

    @gemv.register_fake
    def _(x, weight, bias, block_n, block_k, num_warps):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def use(layer: nn.Module, cfg: Config | None) -> None:
    """Switch one projection (a Linear, GemvLinear or FusedLinear) to ``cfg`` (None: F.linear)."""
    if type(layer) is nn.Linear:
        layer.__class__ = GemvLinear
    layer.gemv_cfg = cfg


def projections(model: nn.Module) -> list[nn.Module]:
    """The model's GEMV-able layers: plain Linears (incl. an untied or tied lm_head) and fused groups."""
    from workers.engine.fused_projections import FusedLinear

    return [m for m in model.modules() if type(m) in (nn.Linear, GemvLinear) or isinstance(m, FusedLinear)]


def graph_time_us(calls: list, replays: int = 5) -> float:
    """Median µs per call of ``calls`` (zero-argument callables) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, cuBLAS picks kernels
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def time_shape(layers: list[nn.Module], configs=CONFIGS) -> dict[Config | None, float]:
    """µs per call of cuBLAS (key None) and each config on these same-shape layers, in turn."""
    _register_op()
    first = layers[0]
    x = torch.randn((1, 1, first.weight.shape[1]), device=first.weight.device, dtype=first.weight.dtype)
    out: dict[Config | None, float] = {}
    for cfg in (None, *configs):
        calls = [lambda m=m: linear(x, m.weight, m.bias, cfg) for m in layers]
        out[cfg] = graph_time_us(calls)
    return out


@torch.inference_mode()
def choose(model: nn.Module) -> list[dict]:
    """Time cuBLAS against the GEMV configs on each weight shape of ``model`` and switch every layer
    of a shape where a config wins; returns one row per shape (for the log and benchmarks)."""
    from workers.engine.fused_projections import FusedLinear

    by_shape: dict[tuple, list[nn.Module]] = defaultdict(list)
    for m in projections(model):
        if m.weight.device.type != "cuda" or m.weight.stride(1) != 1:
            continue
        by_shape[(tuple(m.weight.shape), m.weight.dtype, m.bias is not None)].append(m)
    rows = []
    for (shape, dtype, has_bias), layers in by_shape.items():
        times = time_shape(layers)
        best = min(times, key=times.get)
        for m in layers:
            use(m, best)
        rows.append({"shape": list(shape), "layers": len(layers), "bias": has_bias, "kernel": _name(best),
                     "us": round(times[best], 2), "cublas_us": round(times[None], 2),
                     "fused": isinstance(layers[0], FusedLinear)})
    log.info("batch-1 projections: %s", "; ".join(
        f"{r['shape']} x{r['layers']}: {r['kernel']} {r['us']} us (cuBLAS {r['cublas_us']})" for r in rows))
    return rows


def _name(cfg: Config | None) -> str:
    return "cublas" if cfg is None else "gemv " + "x".join(map(str, cfg))
