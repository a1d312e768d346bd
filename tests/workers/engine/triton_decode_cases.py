"""The split-KV decode kernel (TritonPagedAttention.decode_kernel == "split"), run on the CPU by
Triton's interpreter: decode rows give the torch reference's output and the same cache writes as
the general path (write_kv_kernel + paged_attention_kernel), for contexts on both sides of block
and chunk boundaries (small decode_chunk_keys: one to 19 chunks a row), GQA groups, a sliding
window, padded graph rows, both merges; a decode row's bits do not depend on its step (split
count, padding, prefill chunks beside it); and the engine on the split path (16-key chunks):
generate's tokens (fp32), the same bits when run twice with prefix hits (bf16).

Not collected directly: test_triton_attention.py runs it with TRITON_INTERPRET=1 (see
triton_interpret_cases.py)."""

import os
import random

import pytest
import torch

from kv_transfer.layout import KVLayout
from tests.workers.engine.helpers import PROMPTS, assert_all_blocks_free, collect, hf_greedy, make_engine, run_all
from workers.engine.attention import SeqSlice, TorchPagedAttention
from workers.engine.kv_cache import KVCache
from workers.protocol import SamplingParams

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (tests/workers/engine/test_triton_attention.py does)")
from tests.workers.engine.triton_interpret_cases import random_step, shallow_stack  # noqa: E402
from workers.engine.triton_attention import TritonPagedAttention  # noqa: E402

BS = 16
# (cached, new) per sequence: contexts 1, 15, 16, 17, 129 and 301 tokens (the longest was 1030 until the
# twenty-second session: the interpreter's time goes with the keys, and 301 spans as many kinds of split)
CONTEXTS = [(0, 1), (14, 1), (15, 1), (16, 1), (128, 1), (300, 1)]
# (splits, merge, fused write, keys per tile, keys per chunk): 16-key chunks cut the 301-token
# context into 19 one-tile chunks (one program merges them all, or 4 programs share them), 32-key
# ones the 129-token context into 5; 3 splits share 5 chunks unevenly; 64 splits leave most
# programs without a chunk; None: the auto count (decode_programs 4 on a CPU: 1 split for 6
# sequences) with the default chunking (every context but 301 in one chunk)
VARIANTS = [(1, "last", True, 16, 16), (4, "last", True, 16, 32), (3, "kernel", False, 16, 64),
            (None, "last", True, 64, 256), (4, "kernel", True, 64, 128), (64, "last", True, 16, 16)]


def backends(hq, hkv, dim, dtype, max_tokens=16):
    """Torch reference, general-path and split-path backends over three identical caches."""
    layout = KVLayout("m", 2, hkv, dim, BS, dtype, 32)
    caches = [KVCache(layout, 3) for _ in range(3)]
    for i, seg in caches[0].segments.items():
        seg.normal_()
        for c in caches[1:]:
            c.segments[i].copy_(seg)
    ref = TorchPagedAttention(caches[0])
    general, split = (TritonPagedAttention(c, hq, max_num_batched_tokens=max_tokens, max_num_seqs=8,
                                           max_model_len=1088) for c in caches[1:])
    general.decode_kernel, split.decode_kernel = "general", "split"
    for fast in (general, split):  # other segments at negative offsets, as on a GPU
        fast.anchor = max(fast.kv_cache.segments.values(), key=lambda t: t.data_ptr())
    return caches, ref, general, split


@pytest.fixture
def bf16_dot(monkeypatch):
    """Triton 3.6's interpreter multiplies bf16 dot operands as their raw uint16 storage; this
    widens them to fp32 first (what the GPU's bf16 MMA computes, fp32 accumulation), for the test."""
    import numpy as np
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def wide(x):
            if x.dtype.scalar == interpreter.tl.bfloat16:
                data = interpreter._convert_float(x.data, x.dtype.scalar, interpreter.tl.float32, None)
                return interpreter.TensorHandle(data.view(np.float32), interpreter.tl.float32)
            return x

        return real(self, wide(a), wide(b), d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def same_cache(a: KVCache, b: KVCache) -> bool:
    return all(torch.equal(a.segments[i], b.segments[i]) for i in a.segments)


@pytest.mark.parametrize("hq,hkv,dim,window,sinks", [(8, 2, 16, None, False), (6, 2, 24, None, False),
                                                      (4, 4, 16, 40, False), (2, 1, 32, 5, False), (2, 1, 32, None, True)],
                         ids=["gqa4", "gqa3-d24", "mha-window40", "gqa2-window5", "gqa2-sinks"])
def test_split_decode_matches_reference(hq, hkv, dim, window, sinks):
    torch.manual_seed(hq * 10 + dim)
    rng = random.Random(dim)
    caches, ref, _, split = backends(hq, hkv, dim, "float32")  # ref's writes == write_kv_kernel's
    for n, (splits, merge, fused, block_n, chunk_keys) in enumerate(VARIANTS):
        split.decode_splits, split.decode_combine, split.decode_fuse_write = splits, merge, fused
        split.decode_split_block_n, split.decode_chunk_keys = block_n, chunk_keys
        split.decode_preload = n % 2 == 0  # every other variant with each first tile loaded up front (the default)
        shapes = CONTEXTS[:]
        rng.shuffle(shapes)
        seqs, ids, pos = random_step(rng, caches[0].num_blocks, BS, shapes)
        for b in (ref, split):
            b.prepare(seqs, ids, pos, list(range(len(ids))))
        assert split.step_splits == (splits or 1), split.step_splits  # auto: 4 programs // (6 x hkv) -> 1
        for layer in range(2):
            q, k, v = torch.randn(1, hq, 6, dim), torch.randn(1, hkv, 6, dim), torch.randn(1, hkv, 6, dim)
            head_sinks = torch.randn(hq) * 2 if sinks else None  # counted once in a merge of many chunks
            want = ref.forward(layer, q, k, v, dim ** -0.5, window, None, head_sinks)
            got = split.forward(layer, q, k, v, dim ** -0.5, window, None, head_sinks)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{splits, merge, split.decode_preload}: {m}")
        assert same_cache(caches[0], caches[2]), "cache writes differ"
        assert not split._scratch[3].any(), "arrival counters not reset"


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_split_decode_auto_splits_bf16(batch, bf16_dot):
    """Llama-3.2-1B's attention shape (32 query heads, 8 KV heads, head_dim 64) in bf16, 64-key
    chunks (17 at most: max_model_len 1088), with the automatic split count of a 132-SM GPU (16
    splits at batch 1, 8 at 2, 2 at 5: counted at the padded graph size 8): output close to the
    fp32 reference (as the general path's), cache writes bit-identical to the general path's."""
    torch.manual_seed(batch)
    rng = random.Random(batch)
    caches, ref, general, split = backends(32, 8, 64, "bfloat16")
    split.decode_programs, split.decode_chunk_keys, split.decode_split_block_n = 132, 64, 64
    shapes = [CONTEXTS[i] for i in rng.sample(range(len(CONTEXTS)), batch)]
    seqs, ids, pos = random_step(rng, caches[0].num_blocks, BS, shapes)
    for b in (ref, general, split):
        b.prepare(seqs, ids, pos, list(range(batch)))
    assert split.step_splits == {1: 16, 2: 8, 5: 2}[batch]
    for layer in range(2):
        q = torch.randn(1, 32, batch, 64).bfloat16()
        k, v = torch.randn(1, 8, batch, 64).bfloat16(), torch.randn(1, 8, batch, 64).bfloat16()
        want = ref.forward(layer, q.float(), k, v, 0.125, None)
        for fast in (general, split):
            got = fast.forward(layer, q, k, v, 0.125, None).float()
            assert ((got - want).norm() / want.norm()).item() < 1e-2, fast.decode_kernel
    assert same_cache(caches[1], caches[2]), "cache writes differ from the general path's"


# decode rows (ctx 301, 129, 33, 32, 17: with 32-key chunks 10, 5, 2 (the second holding only the
# new key), 1 and 1 chunks) and, for mixed steps, a 9-token prefill chunk after 20 cached tokens and
# a one-token prompt chunk (a prefix-cache hit's remainder)
DECODES = [("d301", 300, 1, False), ("d129", 128, 1, False), ("d33", 32, 1, False), ("d32", 31, 1, False),
           ("d17", 16, 1, False)]
OTHERS = [("chunk", 20, 9, False), ("prompt1", 4, 1, True)]


def fixed_step(rows, blocks, bs):
    """SeqSlices of ``rows`` (name, cached, new, prompt) packed in order over each name's fixed blocks."""
    seqs, pos, t = [], [], 0
    for name, cached, new, prompt in rows:
        seqs.append(SeqSlice(t, new, cached + new, blocks[name], prompt))
        pos += list(range(cached, cached + new))
        t += new
    return seqs, [1] * t, pos


@pytest.mark.parametrize("window", [None, 40])
def test_decode_rows_bit_identical_in_any_step(window):
    """A decode row's output has the same bits whatever its step: any split count, either merge,
    fused write or not, padded to a graph size, decode-only or beside a prefill chunk and a
    one-token prompt chunk (the general kernel takes those two: their outputs and every cache
    write match the reference). The engine relies on it: with the kernel chosen per step, a
    sequence's tokens changed with what it was batched with (same engine twice, prefix hits)."""
    torch.manual_seed(5)
    caches, ref, _, split = backends(8, 2, 16, "float32", max_tokens=32)
    split.decode_split_block_n, split.decode_chunk_keys = 16, 32
    free = list(range(caches[0].num_blocks))
    random.Random(5).shuffle(free)
    blocks = {name: tuple(free.pop() for _ in range(-(-(c + n) // BS))) for name, c, n, _ in DECODES + OTHERS}
    rows = {name: (torch.randn(8, 16), torch.randn(2, 16), torch.randn(2, 16)) for name, *_ in DECODES + OTHERS}

    def run(backend, order, pad_to=None):
        seqs, ids, pos = fixed_step(order, blocks, BS)
        backend.prepare(seqs, ids, pos, list(range(len(ids))), pad_to=pad_to)
        names = [name for name, _, new, _ in order for _ in range(new)]
        names += [names[0]] * ((pad_to or len(names)) - len(names))  # padding rows: any values
        q, k, v = (torch.stack([rows[n][i] for n in names], 1)[None] for i in range(3))
        out = backend.forward(0, q, k, v, 0.25, window)[0]
        return {n: out[names.index(n)] for n in dict.fromkeys(names)}

    seen = []
    for splits, merge, fused in [(1, "last", True), (4, "last", True), (16, "kernel", False), (3, "kernel", True),
                                 (33, "last", True)]:
        split.decode_splits, split.decode_combine, split.decode_fuse_write = splits, merge, fused
        seen.append(run(split, DECODES))
        assert split.step_decode.all_decode and split.step_splits == splits
    split.decode_preload = False  # the first tile of each program's first chunk not loaded up front: same bits
    for splits, merge, fused in [(1, "last", True), (4, "last", False), (16, "kernel", True)]:
        split.decode_splits, split.decode_combine, split.decode_fuse_write = splits, merge, fused
        seen.append(run(split, DECODES))
    split.decode_preload = True
    split.decode_splits, split.decode_programs = None, 132
    seen.append(run(split, DECODES[1:] + DECODES[:1], pad_to=8))
    assert split.step_splits == 132 // (8 * 2)
    mixed = [OTHERS[0], DECODES[0], OTHERS[1], DECODES[4], DECODES[2], DECODES[1], DECODES[3]]
    seen.append(run(split, mixed))
    assert not split.step_decode.all_decode and split.step_decode.rows == 5
    want = run(ref, mixed)
    for name, *_ in DECODES:
        assert all(torch.equal(got[name], seen[0][name]) for got in seen[1:]), name
    for name in want:
        torch.testing.assert_close(seen[-1][name], want[name], rtol=1e-4, atol=1e-4)
    assert same_cache(caches[0], caches[2]), "cache writes differ"
    assert not split._scratch[3].any()


@pytest.mark.parametrize("merge", ["last", "kernel"])
def test_split_decode_padded_rows(merge):
    """A captured graph's step: 3 sequences padded to 5 rows. Real rows match the reference,
    padding rows are zero and write nothing; the scratch grown for the step stays in use."""
    torch.manual_seed(3)
    rng = random.Random(3)
    caches, ref, _, split = backends(8, 2, 16, "float32")
    split.decode_splits, split.decode_combine, split.decode_split_block_n, split.decode_chunk_keys = 4, merge, 16, 16
    seqs, ids, pos = random_step(rng, caches[0].num_blocks, BS, [(16, 1), (0, 1), (200, 1)])
    ref.prepare(seqs, ids, pos, [0, 1, 2])
    dev_ids, _, _ = split.prepare(seqs, ids, pos, [0, 1, 2], pad_to=5)
    assert dev_ids.shape == (1, 5) and split.step_decode.rows == 5 and split.step_splits == 4
    q, k, v = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    want = ref.forward(1, q[:, :, :3], k[:, :, :3], v[:, :, :3], 0.25, None)
    got = split.forward(1, q, k, v, 0.25, None)
    torch.testing.assert_close(got[:, :3], want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[:, 3:], torch.zeros_like(got[:, 3:]))
    assert same_cache(caches[0], caches[2]), "padding rows wrote KV"
    assert not split._scratch[3].any()


def test_split_decode_settings_are_checked(monkeypatch):
    from workers.engine import triton_attention

    _, _, _, split = backends(4, 2, 16, "float32")
    seqs, ids, pos = random_step(random.Random(0), 8, BS, [(3, 1)])
    for attr, value in [("decode_kernel", "flash"), ("decode_combine", "tree"), ("decode_splits", 0),
                        ("decode_chunk_keys", 96), ("decode_split_block_n", 48), ("decode_split_block_n", 8)]:
        old = getattr(split, attr)
        setattr(split, attr, value)
        with pytest.raises(ValueError, match=attr):
            split.prepare(seqs, ids, pos, [0])
        setattr(split, attr, old)
    long_seqs, long_ids, long_pos = random_step(random.Random(0), 96, BS, [(1099, 1)])  # over max_model_len 1088
    with pytest.raises(ValueError, match="max_model_len"):
        split.prepare(long_seqs, long_ids, long_pos, [0])
    # partials of 8 rows x 2 KV heads x 5 chunks x 2 heads x 18 floats x 4 bytes = 11520 bytes
    monkeypatch.setattr(triton_attention, "MAX_DECODE_SCRATCH_BYTES", 8000)
    with pytest.raises(ValueError, match="decode_chunk_keys"):
        split.prepare(seqs, ids, pos, [0])
    split.decode_chunk_keys = 512  # 3 chunks, 6912 bytes: fits
    split.prepare(seqs, ids, pos, [0])
    monkeypatch.setattr(triton_attention, "DEFAULT_DECODE_KERNEL", "split")  # the config fails at construction
    with pytest.raises(ValueError, match="decode_chunk_keys"):
        backends(4, 2, 16, "float32")


# -- the engine on the split path (16-key chunks: these short prompts span 1 to 5 chunks) ----------
# gpu_check.py's graphs prompts: with block size 4 the second run hits the prefix cache (two prompts
# wholly cached: a 1-token recompute; others a 1-token remainder), so its steps are composed
# differently from the first run's: decodes that shared a step with prefill chunks the first time
# run in decode-only steps, and the last steps hold other numbers of sequences
ENGINE_PROMPTS = PROMPTS + [list(range(200, 260)), [3] * 41, list(range(70, 75))]


def split_engine(model_dir: str, dtype: str, mode: str):
    engine = make_engine(model_dir, dtype=dtype, attention_backend="triton", async_scheduling=mode == "async")
    backend = engine.runner.backend
    # read by every prepare()
    backend.decode_kernel, backend.decode_chunk_keys, backend.decode_split_block_n = "split", 16, 16
    return engine


def run_logprobs(engine, prompts, max_tokens: int) -> dict:
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=True)
    got = collect(engine, {f"r{i}": (p, sp) for i, p in enumerate(prompts)}, with_logprobs=True)
    return {rid: (v[0], v[3]) for rid, v in got.items()}  # tokens, logprob of each


@shallow_stack
def test_engine_split_decode_same_twice_with_prefix_hits(scheduling, tiny_checkpoint, bf16_dot):
    """bf16 tiny qwen3, the split path: the same prompts run twice on one engine, and once with
    decode steps padded as CUDA graph replays run them, give bit-identical tokens and logprobs, as
    the general path does. A sequence's attention must not depend on how
    its step was composed (decode-only or with prefill chunks, how many sequences): on an H100 the
    tokens of this run differed (the model's bf16 logits tie often, so any last-bit change shows)."""
    from workers.engine.argmax import greedy_argmax
    from workers.engine.cuda_graphs import DecodeGraphs

    class EagerPadded(DecodeGraphs):  # what a graph replay runs (padded fixed buffers), eagerly
        def _replay(self, size, ids, pos):
            logits = self._forward(ids, pos)
            return logits, greedy_argmax(logits)

    model_dir = tiny_checkpoint("qwen3")
    engine = split_engine(model_dir, "bfloat16", scheduling)
    first = run_logprobs(engine, ENGINE_PROMPTS, 4)
    second = run_logprobs(engine, ENGINE_PROMPTS, 4)
    assert engine.runner.backend.num_split_steps > 0
    assert [k for k in first if first[k] != second[k]] == []
    assert_all_blocks_free(engine)
    padded = split_engine(model_dir, "bfloat16", scheduling)  # decode-only steps as graph replays would run
    padded.runner.graphs = EagerPadded(padded.runner.model, padded.runner.backend, [1, 2, 4, 8])
    got = run_logprobs(padded, ENGINE_PROMPTS, 4)
    assert padded.runner.graphs.num_replays > 0
    assert [k for k in first if first[k] != got[k]] == []


@shallow_stack
def test_engine_split_decode_matches_generate(scheduling, tiny_checkpoint):
    """fp32 tiny qwen3 on the split path: generate's tokens, the first time and again with prefix hits."""
    model_dir = tiny_checkpoint("qwen3")
    engine = split_engine(model_dir, "float32", scheduling)
    sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = {f"r{i}": hf_greedy(model_dir, p, sampling.max_tokens) for i, p in enumerate(ENGINE_PROMPTS)}
    assert run_all(engine, ENGINE_PROMPTS, sampling=sampling) == want
    again = run_all(engine, ENGINE_PROMPTS, sampling=sampling, prefix="again")
    assert {k.replace("again", "r"): v for k, v in again.items()} == want
    assert_all_blocks_free(engine)
