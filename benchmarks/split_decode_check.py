"""GPU check of the split-KV decode kernel (TritonPagedAttention.decode_kernel == "split"), run by
gpu_check.py's `kernels` check: bf16 decode-only steps against the torch reference (relative
error) and the general path (identical cache writes), for several split counts, both merges,
the fused K/V write on and off; repeated launches bit-identical (the in-kernel merge's arrival
counter must order every split's partial before the merge reads it); and one decode step
captured in a CUDA graph at 8 padded rows, replayed over other steps' metadata."""

from __future__ import annotations

import random

import torch

from kv_transfer.layout import KVLayout
from workers.engine.attention import SeqSlice, TorchPagedAttention
from workers.engine.kv_cache import KVCache

CONTEXTS = [1, 15, 16, 17, 129, 1030]
# (splits (None: auto), merge, fused write, keys per tile)
VARIANTS = [(None, "last", True, 64), (None, "kernel", True, 64), (4, "last", False, 16), (1, "last", True, 128),
            (16, "last", True, 32), (3, "kernel", False, 64)]
REPEATS = 30


def _backends(hq, hkv, dim):
    from workers.engine.triton_attention import TritonPagedAttention

    layout = KVLayout("m", 2, hkv, dim, 16, "bfloat16", 256)
    caches = [KVCache(layout, 3, "cuda") for _ in range(3)]
    for i, seg in caches[0].segments.items():
        seg.normal_()
        for c in caches[1:]:
            c.segments[i].copy_(seg)
    ref = TorchPagedAttention(caches[0])
    general, split = (TritonPagedAttention(c, hq, 512, 16, 2048) for c in caches[1:])
    general.decode_kernel, split.decode_kernel = "general", "split"
    return caches, ref, general, split


def _step(rng, num_blocks, contexts):
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs = [SeqSlice(i, 1, ctx, tuple(free.pop() for _ in range(-(-ctx // 16)))) for i, ctx in enumerate(contexts)]
    return seqs, [1] * len(seqs), [ctx - 1 for ctx in contexts]


def _rel(got, want) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def _same(a: KVCache, b: KVCache) -> bool:
    return all(torch.equal(a.segments[i], b.segments[i]) for i in a.segments)


def check_split_decode() -> dict:
    worst, launches = 0.0, 0
    for hq, hkv, dim, window in [(32, 8, 64, None), (8, 2, 128, None), (4, 4, 64, 7), (12, 4, 64, None)]:
        caches, ref, general, split = _backends(hq, hkv, dim)
        rng = random.Random(hq * dim)
        for splits, merge, fused, block_n in VARIANTS:
            split.decode_splits, split.decode_combine, split.decode_fuse_write = splits, merge, fused
            split.decode_split_block_n = block_n
            for batch in (1, 3, 6):
                seqs, ids, pos = _step(rng, caches[0].num_blocks, rng.sample(CONTEXTS, batch))
                for b in (ref, general, split):
                    b.prepare(seqs, ids, pos, list(range(batch)))
                shape = (1, hq, batch, dim)
                q = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                k, v = (torch.randn(1, hkv, batch, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                want = ref.forward(1, q.float(), k, v, dim ** -0.5, window).float()
                general.forward(1, q, k, v, dim ** -0.5, window)
                first = split.forward(1, q, k, v, dim ** -0.5, window)
                for _ in range(REPEATS):  # the same step again: same slots, same values, same output
                    again = split.forward(1, q, k, v, dim ** -0.5, window)
                    if not torch.equal(again, first):
                        raise AssertionError(f"split decode {splits, merge} not repeatable (a merge race?)")
                launches += REPEATS + 1
                err = _rel(first, want)
                worst = max(worst, err)
                if not torch.isfinite(first).all() or err > 1e-2:
                    raise AssertionError(f"split decode {hq, hkv, dim, window} {splits, merge, fused, block_n} "
                                         f"batch {batch}: relative error {err:.2e}")
                if not (_same(caches[0], caches[2]) and _same(caches[1], caches[2])):
                    raise AssertionError(f"split decode {splits, merge, fused}: cache writes differ")
                if split._scratch[3].any():
                    raise AssertionError("split decode arrival counters not reset")
    graph_err = max(_check_graph(1, (1, 1, 1)), _check_graph(8, (1, 5, 8, 2)))
    return {"split_decode_max_rel_err": round(worst, 5), "split_decode_launches": launches,
            "split_decode_graph_max_rel_err": round(graph_err, 5)}


def _check_graph(size: int, batches: tuple[int, ...]) -> float:
    """A decode step of ``size`` padded rows (Llama-3.2-1B's heads; auto splits: 16 at size 1, 2 at
    8) captured once, replayed over steps of ``batches`` sequences: real rows match the
    reference, padding rows are zero, cache writes equal the reference's."""
    caches, ref, _, split = _backends(32, 8, 64)
    rng = random.Random(size)
    q = torch.zeros(1, 32, size, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.zeros_like(q[:, :8]), torch.zeros_like(q[:, :8])
    split.prepare([], [], [], None, pad_to=size)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        split.forward(0, q, k, v, 0.125, None)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = split.forward(0, q, k, v, 0.125, None)
    worst = 0.0
    for batch in batches:
        seqs, ids, pos = _step(rng, caches[0].num_blocks, [rng.choice(CONTEXTS) for _ in range(batch)])
        ref.prepare(seqs, ids, pos, list(range(batch)))
        split.prepare(seqs, ids, pos, list(range(batch)), pad_to=size)
        for t in (q, k, v):
            t.normal_()
        graph.replay()
        want = ref.forward(0, q[:, :, :batch].float(), k[:, :, :batch], v[:, :, :batch], 0.125, None).float()
        worst = max(worst, _rel(out[:, :batch], want))
        if worst > 1e-2 or not torch.equal(out[:, batch:], torch.zeros_like(out[:, batch:])):
            raise AssertionError(f"split decode graph of {size} replayed at batch {batch}: relative error {worst:.2e}")
        if not _same(caches[0], caches[2]):
            raise AssertionError("split decode graph replay: cache writes differ")
    return worst
