"""GPU check of the split-KV decode kernel (TritonPagedAttention.decode_kernel == "split"), run by
gpu_check.py's `kernels` check (or alone: python3 benchmarks/split_decode_check.py):

- bf16 decode-only steps against the torch reference (relative error) and the general path
  (identical cache writes), for several split counts, chunk sizes (16 to 256 keys: one to 129
  chunks a row), both merges, the fused K/V write on and off; repeated launches bit-identical
  (the in-kernel merge's arrival counter must order every split's partial before the merge reads
  it); decode steps captured in CUDA graphs at 1, 8 and 4 (32-key chunks) padded rows, replayed
  over other steps' metadata;
- a decode row's output bit-identical in any step: split counts, both merges, padded, beside a
  prefill chunk and a one-token prompt chunk (compiled variants of the kernel must round alike),
  with the default 256-key chunks and with 32-key ones;
- the engine on the split path (tiny qwen3, 16-key chunks so that its short prompts span several):
  bf16, the same eager engine twice (the second run with prefix-cache hits) bit-identical in
  tokens and logprobs; uncompiled CUDA graphs bit-identical to eager; compiled ones (inductor
  fuses the norms/RoPE around attention, so their last bits differ from eager's) token-identical
  to eager up to a near-tie (both choices within NEAR_TIE_LOGPROB and in each other's top-5, the
  first divergence of each request reported); fp32 token-identical to generate. The general
  kernel goes through the same graph comparisons as the baseline.

Every engine case runs; failures are listed together (and printed as one JSON line) at the end."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kv_transfer.layout import KVLayout  # noqa: E402
from workers.engine.attention import SeqSlice, TorchPagedAttention  # noqa: E402
from workers.engine.kv_cache import KVCache  # noqa: E402

CONTEXTS = [1, 15, 16, 17, 129, 1030]
# (splits (None: auto), merge, fused write, keys per tile, keys per chunk)
VARIANTS = [(None, "last", True, 64, 256), (None, "kernel", True, 64, 256), (4, "last", False, 16, 32),
            (1, "last", True, 128, 256), (16, "last", True, 32, 64), (3, "kernel", False, 64, 128),
            (None, "last", True, 16, 16), (64, "last", True, 16, 16)]
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
        for n, (splits, merge, fused, block_n, chunk_keys) in enumerate(VARIANTS):
            split.decode_splits, split.decode_combine, split.decode_fuse_write = splits, merge, fused
            split.decode_split_block_n, split.decode_chunk_keys = block_n, chunk_keys
            # every other variant with the first tiles loaded up front, and under PDL (a launch
            # attribute only: nothing before it triggers early, so its wait returns at once)
            split.decode_preload = split.decode_pdl = n % 2 == 1
            split.decode_prefetch = n % 4 != 3  # and half of those under PDL without the L2 prefetch
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
                    raise AssertionError(f"split decode {hq, hkv, dim, window} "
                                         f"{splits, merge, fused, block_n, chunk_keys, split.decode_preload} "
                                         f"batch {batch}: relative error {err:.2e}")
                if not (_same(caches[0], caches[2]) and _same(caches[1], caches[2])):
                    raise AssertionError(f"split decode {splits, merge, fused}: cache writes differ")
                if split._scratch[3].any():
                    raise AssertionError("split decode arrival counters not reset")
    graph_err = max(_check_graph(1, (1, 1, 1)), _check_graph(8, (1, 5, 8, 2)), _check_graph(4, (1, 3, 4), (32, 32)))
    kernel = {"split_decode_max_rel_err": round(worst, 5), "split_decode_launches": launches,
              "split_decode_graph_max_rel_err": round(graph_err, 5),
              "split_decode_any_step_rel_err": max(_check_any_step(None), _check_any_step((32, 32)))}
    return {**kernel, **check_split_engine()}


def _check_graph(size: int, batches: tuple[int, ...], chunking: tuple[int, int] | None = None) -> float:
    """A decode step of ``size`` padded rows (Llama-3.2-1B's heads; auto splits on 132 SMs with
    256-key chunks: 8 at size 1 (2048 / 256), 2 at 8; with 32-key chunks: 4 at 4) captured once,
    replayed over steps of ``batches`` sequences: real rows match the reference, padding rows are
    zero, cache writes equal the reference's. chunking: (keys per chunk, keys per tile)."""
    caches, ref, _, split = _backends(32, 8, 64)
    if chunking is not None:
        split.decode_chunk_keys, split.decode_split_block_n = chunking
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


def _check_any_step(chunking: tuple[int, int] | None) -> float:
    """Five decode rows (contexts 2048, 257, 256, 129, 17; Llama-1B heads, bf16) in decode-only
    steps at several split counts and merges, padded to 8 rows, and beside a prefill chunk and a
    one-token prompt chunk: each row's output bit-identical across all of them. chunking: (keys
    per chunk, keys per tile), None: the default (256-key chunks: 8, 2, 1, 1, 1 a row)."""
    caches, ref, _, split = _backends(32, 8, 64)
    if chunking is not None:
        split.decode_chunk_keys, split.decode_split_block_n = chunking
    rng = random.Random(17)
    free = list(range(caches[0].num_blocks))
    rng.shuffle(free)
    shapes = {"d2048": (2047, 1, False), "d257": (256, 1, False), "d256": (255, 1, False), "d129": (128, 1, False),
              "d17": (16, 1, False), "chunk": (20, 9, False), "prompt1": (4, 1, True)}
    blocks = {n: tuple(free.pop() for _ in range(-(-(c + k) // 16))) for n, (c, k, _) in shapes.items()}
    rows = {n: [torch.randn(h, 64, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8)] for n in shapes}

    def run(backend, order, pad_to=None):
        seqs, pos, names = [], [], []
        for n in order:
            cached, new, prompt = shapes[n]
            seqs.append(SeqSlice(len(names), new, cached + new, blocks[n], prompt))
            pos += list(range(cached, cached + new))
            names += [n] * new
        backend.prepare(seqs, [1] * len(names), pos, list(range(len(names))), pad_to=pad_to)
        names += [names[0]] * ((pad_to or len(names)) - len(names))
        q, k, v = (torch.stack([rows[n][i] for n in names], 1)[None] for i in range(3))
        out = backend.forward(0, q.float() if backend is ref else q, k, v, 0.125, None)[0]
        return {n: out[names.index(n)].clone() for n in dict.fromkeys(names)}

    decodes = ["d2048", "d257", "d256", "d129", "d17"]
    seen = []
    for splits, merge, fused in [(1, "last", True), (16, "last", True), (5, "kernel", False), (None, "last", True),
                                 (64, "last", True)]:
        split.decode_splits, split.decode_combine, split.decode_fuse_write = splits, merge, fused
        seen.append(run(split, decodes))
    # the same bits: first tiles up front or not, under PDL or not, with its L2 prefetch or not
    for preload, pdl, prefetch in [(False, False, True), (True, True, True), (False, True, True), (True, True, False),
                                   (False, True, False)]:
        split.decode_preload, split.decode_pdl, split.decode_prefetch = preload, pdl, prefetch
        seen.append(run(split, decodes))
    split.decode_preload, split.decode_pdl, split.decode_prefetch = True, False, True  # the defaults
    seen.append(run(split, decodes[::-1], pad_to=8))
    mixed = ["chunk", "d2048", "prompt1", "d17", "d257", "d129", "d256"]
    seen.append(run(split, mixed))
    want = run(ref, mixed)
    torch.cuda.synchronize()
    for n in decodes:
        if not all(torch.equal(got[n], seen[0][n]) for got in seen[1:]):
            raise AssertionError(f"split decode row {n} {chunking}: output bits depend on the step "
                                 "(splits/padding/mixed)")
    err = max(_rel(seen[-1][n], want[n].float()) for n in want)
    if err > 1e-2 or not _same(caches[0], caches[2]):
        raise AssertionError(f"split decode beside prefill chunks {chunking}: relative error {err:.2e} or cache "
                             "writes differ")
    return round(err, 5)


def check_split_engine() -> dict:
    """The engine on the split path (see the module docstring); raises listing every failure."""
    from benchmarks.gpu_check import CACHE, hf_generate, make
    from tests.tiny_models import build_tiny_checkpoint
    from tests.workers.engine.helpers import PROMPTS, collect, run_all
    from workers.engine import triton_attention
    from workers.protocol import SamplingParams

    d = str(build_tiny_checkpoint("qwen3", CACHE / "tiny-qwen3"))
    prompts = PROMPTS + [list(range(200, 260)), [3] * 41, list(range(70, 75))]  # gpu_check's graphs prompts
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=5)
    reqs = {f"r{i}": (p, sp) for i, p in enumerate(prompts)}
    out, failed = {}, []

    def differ(a, b, tokens_only=False):
        return [k for k in a if (a[k][0] != b[k][0] if tokens_only else a[k][:4] != b[k][:4])]

    saved = triton_attention.DEFAULT_DECODE_KERNEL, triton_attention.DEFAULT_DECODE_CHUNKING
    try:
        # 16-key chunks of 16-key tiles: these prompts' rows span 1 to 5 chunks (merged), not one
        triton_attention.DEFAULT_DECODE_CHUNKING = (16, 16)
        for kernel in ("general", "split"):  # general: the baseline of every comparison
            triton_attention.DEFAULT_DECODE_KERNEL = kernel  # before the engines capture their graphs
            eager = make(d, dtype="bfloat16", cuda_graphs=False)
            first, second = collect(eager, reqs, with_logprobs=True), collect(eager, reqs, with_logprobs=True)
            out[f"{kernel}_eager_twice_differ"] = differ(first, second)
            for compiled in (False, True):
                graphs = make(d, dtype="bfloat16", compile_decode=compiled)
                got = collect(graphs, reqs, with_logprobs=True)
                name = f"{kernel}_graphs{'_compiled' if compiled else ''}"
                out[f"{name}_tokens_differ"] = differ(first, got, tokens_only=True)
                out[f"{name}_logprobs_differ"] = differ(first, got)
                if graphs.runner.graphs.num_replays == 0:
                    failed.append(f"{name}: no graph replay")
                if not compiled and out[f"{name}_logprobs_differ"]:  # the same launches, replayed
                    failed.append(f"{name} != eager (tokens or logprobs)")
                if compiled:  # inductor fuses the ops around attention: last bits differ, ties may flip
                    out[f"{name}_divergences"] = ties = _divergences(first, got)
                    if any(not t["near_tie"] for t in ties):
                        failed.append(f"{name} diverged from eager outside a near-tie")
            if kernel == "general":
                continue
            if out["split_eager_twice_differ"]:
                failed.append("eager twice (prefix hits) not bit-identical")
            if eager.runner.backend.num_split_steps == 0:
                failed.append("the split path never ran")
            fp32 = make(d, cuda_graphs=False)
            want = {f"r{i}": hf_generate(d, p, 12) for i, p in enumerate(prompts)}
            got = [run_all(fp32, prompts), run_all(fp32, prompts, prefix="r")]
            out["split_fp32_vs_generate_differ"] = sorted({k for g in got for k in want if g[k] != want[k]})
            if out["split_fp32_vs_generate_differ"]:
                failed.append("fp32 != generate")
    finally:
        triton_attention.DEFAULT_DECODE_KERNEL, triton_attention.DEFAULT_DECODE_CHUNKING = saved
    print(json.dumps({"split_engine": out, "failed": failed}), flush=True)
    if failed:
        raise AssertionError(f"split decode engine: {failed}; {json.dumps(out)}")
    return {"split_engine_cases": len(out)}


# a near-tie: the two choices' logprobs (each side's own) within this of each other, each in the
# other's top-5 (the bf16 rule); bf16 logits carry ~3 significant digits
NEAR_TIE_LOGPROB = 0.05


def _divergences(want: dict, got: dict) -> list[dict]:
    """Where each request's greedy tokens first differ, and whether that was a near-tie."""
    out = []
    for rid, (a, *_, a_lp, a_top) in want.items():
        b, *_, b_lp, b_top = got[rid]
        j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if j is None:
            continue
        a_ids, b_ids = [t for t, _ in a_top[j]], [t for t, _ in b_top[j]]
        gap = abs(a_lp[j] - b_lp[j])
        out.append({"request": rid, "position": j, "eager": a[j], "other": b[j], "logprob_gap": round(gap, 4),
                    "near_tie": gap <= NEAR_TIE_LOGPROB and a[j] in b_ids and b[j] in a_ids})
    return out


if __name__ == "__main__":
    print(json.dumps({"split_decode_check": check_split_decode(), "card": torch.cuda.get_device_name()}))
