"""Greedy argmax of logits rows on the GPU in two small Triton launches, captured into the decode
CUDA graphs (workers/engine/cuda_graphs.py), so a greedy step's token ids leave the graph with its
logits and the sampler launches nothing for them.

torch's argmax of a step's 128k-wide rows took 37 µs of a batch-1 step on an H200 and 27 µs at
batch 8-32, launched after the graph (benchmarks/README.md, the async step's timeline; ~4 % of the
fused batch-1 step). Here every row is cut into chunks of ``block`` columns, one program each (the
row's max and its first index in the chunk), then one program a row merges the chunks: 3.6 µs at
batch 1, inside the graph.

Same result as ``torch.argmax(x, dim=-1)``, ties and NaNs included: the first index of the
largest value; a row with a NaN gives its first NaN's index (torch orders NaN above everything);
a row of -inf gives 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK = 4096  # columns per program: 32 programs a row for a 128k vocabulary


@triton.jit
def argmax_chunks_kernel(X, x_stride, n_cols, n_chunks, PART_VAL, PART_IDX, PART_NAN, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row.to(tl.int64) * x_stride + cols, mask=inside, other=float("-inf")).to(tl.float32)
    nan = (x != x) & inside
    first_nan = tl.min(tl.where(nan, cols, 2147483647))
    x = tl.where(nan, float("-inf"), x)
    best = tl.max(x)
    # the first column holding the max (a chunk always has a column inside the row: -inf padding
    # comes after it)
    first = tl.min(tl.where((x == best) & inside, cols, 2147483647))
    has_nan = first_nan < 2147483647
    out = row * n_chunks + chunk
    tl.store(PART_VAL + out, best)
    tl.store(PART_IDX + out, tl.where(has_nan, first_nan, first))
    tl.store(PART_NAN + out, has_nan.to(tl.int32))


@triton.jit
def argmax_merge_kernel(PART_VAL, PART_IDX, PART_NAN, n_chunks, OUT, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    ok = c < n_chunks
    val = tl.load(PART_VAL + row * n_chunks + c, mask=ok, other=float("-inf"))
    idx = tl.load(PART_IDX + row * n_chunks + c, mask=ok, other=0)
    nan = tl.load(PART_NAN + row * n_chunks + c, mask=ok, other=0) != 0
    first_nan_chunk = tl.min(tl.where(nan, c, 2147483647))
    best = tl.max(val)
    first_best_chunk = tl.min(tl.where((val == best) & ok, c, 2147483647))
    chosen = tl.where(first_nan_chunk < 2147483647, first_nan_chunk, first_best_chunk)
    tl.store(OUT + row, tl.sum(tl.where(c == chosen, idx, 0)).to(tl.int64))


def greedy_argmax(logits: torch.Tensor, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """int64 [rows]: torch.argmax(logits, dim=-1) for 2-D logits whose rows are contiguous."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"greedy_argmax wants [rows, cols] logits with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"greedy_argmax block={block}: want a power of two >= 16")
    rows, cols = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if cols == 0:
        raise ValueError("greedy_argmax of rows with no columns")
    chunks = triton.cdiv(cols, block)
    part_val = torch.empty(rows * chunks, dtype=torch.float32, device=logits.device)
    part_idx = torch.empty(rows * chunks, dtype=torch.int32, device=logits.device)
    part_nan = torch.empty(rows * chunks, dtype=torch.int32, device=logits.device)
    argmax_chunks_kernel[(rows, chunks)](logits, logits.stride(0), cols, chunks, part_val, part_idx, part_nan,
                                         BLOCK=block, num_warps=8 if block >= 4096 else 4)
    argmax_merge_kernel[(rows,)](part_val, part_idx, part_nan, chunks, out,
                                 BLOCK_C=max(16, triton.next_power_of_2(chunks)), num_warps=1)
    return out
