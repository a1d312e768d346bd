"""The Triton backend's decode-only staging (TritonPagedAttention._prepare_decode) writes exactly the
metadata the general staging writes: same host and device buffers, same launch plan, step after
step. Host-side only (no kernel runs), so no interpreter is needed."""

import random

import pytest

from kv_transfer.layout import KVLayout
from workers.engine.attention import SeqSlice
from workers.engine.cuda_graphs import capture_sizes
from workers.engine.kv_cache import KVCache

try:
    from workers.engine.triton_attention import TritonPagedAttention
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("these tests need triton: pip install -e '.[test]'") from e

BS, MAX_SEQS, MAX_LEN = 4, 16, 64


def _pair():
    layout = KVLayout("m", 2, 2, 8, BS, "float32", 8)
    cache = KVCache(layout, 40)  # blocks of a step span many segments
    fast, general = (TritonPagedAttention(cache, 4, max_num_batched_tokens=32, max_num_seqs=MAX_SEQS,
                                          max_model_len=MAX_LEN) for _ in range(2))
    general.anchor = fast.anchor  # one anchor: equal block offsets
    general.decode_staging = False
    return fast, general


def _decode_step(rng: random.Random, n: int, free: list[int]) -> tuple[list[SeqSlice], list[int], list[int]]:
    seqs, ids, pos = [], [], []
    for i in range(n):
        ctx = rng.randint(1, MAX_LEN)
        seqs.append(SeqSlice(i, 1, ctx, tuple(rng.sample(free, -(-ctx // BS))), False))
        ids.append(rng.randrange(100))
        pos.append(ctx - 1)
    return seqs, ids, pos


def _state(b: TritonPagedAttention, out) -> tuple:
    ids, pos, keep = out
    return (b.meta.np.tolist(), b.meta.dev.tolist(), b.step_decode, b.block_q, b.num_qblocks, b.num_tokens,
            b.step_splits, ids.tolist(), pos.tolist(), keep.tolist())


def test_decode_staging_matches_the_general_staging():
    fast, general = _pair()
    rng = random.Random(0)
    free = list(range(fast.kv_cache.num_blocks))
    sizes = capture_sizes(MAX_SEQS)
    steps = 0
    for n in [0, 1, 2, 3, 5, 8, 13, 16] * 3:
        seqs, ids, pos = _decode_step(rng, n, free)
        pad_to = next((s for s in sizes if s >= max(n, 1)), None)
        for pad in (pad_to, None) if n else (pad_to,):
            keep = list(range(n))
            before = fast.num_split_steps
            got = _state(fast, fast.prepare(seqs, ids, pos, keep, pad_to=pad))
            want = _state(general, general.prepare(seqs, ids, pos, keep, pad_to=pad))
            assert got == want, f"{n} decode rows, pad_to={pad}"
            assert fast.num_split_steps == before + 1  # a split decode step either way
            steps += 1
    assert steps > 30


def test_mixed_steps_take_the_general_staging_in_both():
    """A prompt chunk, a one-token prompt row or rows out of order: not the decode path, same result."""
    fast, general = _pair()
    cases = [
        [SeqSlice(0, 3, 7, (1, 2)), SeqSlice(3, 1, 9, (5, 6, 7))],  # a prefill chunk beside a decode
        [SeqSlice(0, 1, 5, (3, 4), True), SeqSlice(1, 1, 9, (8, 9, 10))],  # a one-token prompt chunk
    ]
    for seqs in cases:
        T = sum(s.q_len for s in seqs)
        ids, pos = list(range(T)), [p for s in seqs for p in range(s.ctx_len - s.q_len, s.ctx_len)]
        got = _state(fast, fast.prepare(seqs, ids, pos, [T - 1]))
        want = _state(general, general.prepare(seqs, ids, pos, [T - 1]))
        assert got == want
    with pytest.raises(ValueError, match="packed in order"):
        fast.prepare([SeqSlice(1, 1, 5, (1, 2)), SeqSlice(0, 1, 5, (3, 4))], [1, 2], [4, 4], [0, 1], pad_to=2)


def test_longer_block_tables_are_cut_to_the_context():
    """SeqSlices may carry more blocks than their context needs (tests, benchmarks): only the first
    ceil(ctx / block_size) are staged, as by the general staging."""
    fast, general = _pair()
    seqs = [SeqSlice(0, 1, 5, (3, 4, 11, 12)), SeqSlice(1, 1, 2, (7, 8, 9))]
    got = _state(fast, fast.prepare(seqs, [1, 2], [4, 1], [0, 1], pad_to=2))
    want = _state(general, general.prepare(seqs, [1, 2], [4, 1], [0, 1], pad_to=2))
    assert got == want
    assert fast.meta.host_i64("blocks")[:3].tolist() == [
        int(fast.seg_off[b // 8] + (b % 8) * fast.block_elems) for b in (3, 4, 7)]


def test_token_fill_writes_the_rows_it_names():
    """In order (a steady decode step: one copy) and out of order (an index upload): same rule,
    row rows[j] gets source[index[j]]."""
    import torch

    from workers.engine.attention import TokenFill

    source = torch.tensor([50, 60, 70, 80])
    ids = torch.zeros(1, 6, dtype=torch.int32)
    TokenFill((0, 1, 2), (0, 1, 2), source).apply(ids)
    assert ids.tolist() == [[50, 60, 70, 0, 0, 0]]
    ids.zero_()
    TokenFill((1, 4), (3, 0), source).apply(ids)
    assert ids.tolist() == [[0, 80, 0, 0, 50, 0]]
    ids.zero_()
    TokenFill((0, 1), (1, 0), source).apply(ids)  # rows in order, indices not
    assert ids.tolist() == [[60, 50, 0, 0, 0, 0]]


def _reference_pack(requests, num_new_tokens):
    """StepInputs.pack before its one-token path: every request through the general rule."""
    ids, positions, seqs, logits_indices, sampled, fill_rows, fill_index = [], [], [], [], [], [], []
    for req, n in zip(requests, num_new_tokens):
        c, known = req.num_computed_tokens, req.num_tokens
        q_start = len(ids)
        ids += req.token_ids(c, min(c + n, known))
        if c + n > known:
            fill_rows.append(len(ids))
            fill_index.append(req.pending_row)
            ids.append(0)
        positions += range(c, c + n)
        seqs.append(SeqSlice(q_start, n, c + n, tuple(req.block_ids), c < req.num_prompt_tokens))
        if c + n == req.num_tokens_with_pending:
            logits_indices.append(q_start + n - 1)
            sampled.append(req)
    return ids, positions, seqs, logits_indices, sampled, fill_rows, fill_index


def test_pack_one_token_path_matches_the_general_rule():
    from workers.engine.request import Request
    from workers.engine.step_inputs import StepInputs
    from workers.protocol import SamplingParams

    sp = SamplingParams(max_tokens=8, temperature=0)

    def req(name, prompt, outputs, computed, pending=0, row=0):
        r = Request(name, prompt, sp, BS)
        for t in outputs:
            r.append_output(t)
        r.num_computed_tokens, r.num_pending, r.pending_row = computed, pending, row
        r.block_ids = tuple(range(10, 10 + -(-(r.num_tokens + pending) // BS)))
        return r

    reqs = [
        req("decode", [1, 2, 3, 4, 5], [6, 7], computed=6),  # its newest known token
        req("pending", [1, 2, 3], [8], computed=4, pending=1, row=3),  # a token only the device knows
        req("prompt-tail", [1, 2, 3, 4], [], computed=3),  # a one-token prompt remainder
        req("short", [1, 2, 3], [9], computed=3, pending=1),  # budget cut to 1 of 2: not sampled
        req("chunk", [5, 6, 7, 8, 9, 10], [], computed=2),  # a prefill chunk
        req("chunk+pending", [1, 2], [3, 4], computed=2, pending=1, row=1),  # recompute after preemption
    ]
    nums = [1, 1, 1, 1, 3, 3]
    s = StepInputs.pack(reqs, nums)
    got = (s.input_ids, s.positions, s.seqs, s.logits_indices, s.sampled, s.fill_rows, s.fill_index)
    assert got == _reference_pack(reqs, nums)
    assert [r.request_id for r in s.sampled] == ["decode", "pending", "prompt-tail", "chunk+pending"]
