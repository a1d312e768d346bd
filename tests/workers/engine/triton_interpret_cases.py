"""The Triton attention kernels, run on the CPU by Triton's interpreter, checked against the torch
reference backend: same cache writes, same attention output, for mixed prefill/decode steps over
blocks spread across several segments; and the engine on the Triton backend token-exact against
transformers' generate.

Not collected by the suite directly: test_triton_attention.py runs this file in a fresh process
with TRITON_INTERPRET=1, which must be set before triton is first imported, and with its own
scheduling mode (conftest.py): the engine cases run with sync and with async scheduling."""

import functools
import os
import random
import threading

import pytest
import torch

from kv_transfer.layout import KVLayout
from tests.workers.engine.helpers import GREEDY, PROMPTS, assert_all_blocks_free, hf_greedy, make_engine, run_all
from workers.engine.attention import SeqSlice, TorchPagedAttention
from workers.engine.kv_cache import KVCache

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (tests/workers/engine/test_triton_attention.py does)")
from workers.engine.triton_attention import TritonPagedAttention  # noqa: E402


def random_step(rng: random.Random, num_blocks: int, bs: int, shapes):
    """Sequences with (cached, new) token counts, each with distinct random blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    seqs, ids, pos, t = [], [], [], 0
    for cached, new in shapes:
        ctx = cached + new
        blocks = tuple(free.pop() for _ in range(-(-ctx // bs)))
        seqs.append(SeqSlice(t, new, ctx, blocks))
        ids += [rng.randrange(100) for _ in range(new)]
        pos += list(range(cached, ctx))
        t += new
    return seqs, ids, pos


def shallow_stack(test):
    """Runs ``test`` in a fresh thread, at the bottom of a fresh frame stack. CPython 3.11 keeps
    frames in 16 KiB chunks, mapping one when a call crosses into it and unmapping it when that
    call returns: at pytest's depth the interpreter's hot loop crossed a chunk edge ~2M times in one
    engine case (an mmap and a munmap each; 26 s instead of 10 s on the 2-core box, half of it
    system time). From a thread's first frame the engine cases stay inside the first chunk, ~15
    small frames short of its end (a deeper call path would only make them slower again)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        raised = []

        def target():
            try:
                test(*args, **kwargs)
            except BaseException as e:  # re-raised in pytest's thread, with its traceback
                raised.append(e)

        # daemon: after a pytest-timeout in this thread the process must not wait for it to end
        thread = threading.Thread(target=target, name=test.__name__, daemon=True)
        thread.start()
        thread.join()
        if raised:
            raise raised[0]

    return run


# Kernel-only cases do not depend on the engine's scheduling mode: run once, not once per mode
# (conftest.py's autouse fixture would run them in each; test_triton_attention.py checks both sets).
ONCE = pytest.mark.parametrize("scheduling", ["once"])


@ONCE
@pytest.mark.parametrize("hq,hkv,dim,window,softcap,sinks", [(4, 2, 16, None, None, False), (8, 2, 32, None, None, False),
                                                              (4, 4, 16, 5, None, False), (6, 2, 24, None, None, False),
                                                              (4, 2, 16, 5, 1.5, False), (4, 2, 16, 5, None, True)],
                         ids=["gqa2", "gqa4-d32", "mha-window5", "gqa3-d24", "gqa2-window5-softcap",
                              "gqa2-window5-sinks"])
def test_kernels_match_torch_reference(hq, hkv, dim, window, softcap, sinks):
    torch.manual_seed(hq * 100 + dim)
    rng = random.Random(hq + dim)
    bs, bps, layers = 4, 8, 2
    layout = KVLayout("m", layers, hkv, dim, bs, "float32", bps)
    caches = [KVCache(layout, 3), KVCache(layout, 3)]  # 3 segments: blocks of a step span all of them
    for c in caches[1:]:
        for i, seg in c.segments.items():
            seg.copy_(caches[0].segments[i])
    for seg in caches[0].segments.values():
        seg.normal_()
    for i, seg in caches[1].segments.items():
        seg.copy_(caches[0].segments[i])
    ref = TorchPagedAttention(caches[0])
    fast = TritonPagedAttention(caches[1], hq, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64)
    # anchor at the highest segment: the others sit at negative offsets (as on a GPU, where the
    # anchor is allocated after the cache and segments come and go)
    fast.anchor = max(caches[1].segments.values(), key=lambda t: t.data_ptr())
    # decodes, a fresh prefill, a chunk after cached context, a one-token chunk; then with 16-key
    # tiles, contexts long enough that tiles wholly before a query block's first row (the kernel's
    # unmasked loop with split_diagonal) come before the masked diagonal ones, both ways
    long = [[(40, 1), (33, 6)], [(0, 50)], [(21, 30), (2, 1)]]
    steps = [(64, False, [(9, 1), (0, 7), (12, 6), (3, 1)]), (64, False, [(5, 1), (17, 1)]), (64, False, [(0, 19)])]
    steps += [(16, split, shapes) for split in (True, False) for shapes in long]
    for block_n, split, shapes in steps:
        fast.prefill_block_n, fast.decode_block_n = block_n, (128 if block_n == 64 else block_n)
        fast.split_diagonal = split
        seqs, ids, pos = random_step(rng, caches[0].num_blocks, bs, shapes)
        T = len(ids)
        ref.prepare(seqs, ids, pos, [T - 1])
        fast.prepare(seqs, ids, pos, [T - 1])
        assert (fast.seg_off[:3] < 0).sum() == 2
        for layer in range(layers):
            q, k, v = torch.randn(1, hq, T, dim), torch.randn(1, hkv, T, dim), torch.randn(1, hkv, T, dim)
            q = q * 2 if softcap else q  # scores past the cap: it bites
            # gpt-oss's sinks, about the scores' size (they take a share of every row's softmax)
            head_sinks = torch.randn(hq) * 2 if sinks else None
            want = ref.forward(layer, q, k, v, dim ** -0.5, window, softcap, head_sinks)
            got = fast.forward(layer, q, k, v, dim ** -0.5, window, softcap, head_sinks)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for i in caches[0].segments:
            assert torch.equal(caches[0].segments[i], caches[1].segments[i]), "cache writes differ"


@ONCE
@pytest.mark.parametrize("softcap,sinks", [(None, False), (1.5, False), (None, True)])
def test_compiled_path_op_matches_direct_call(softcap, sinks):
    """Under torch.compile the backend runs as the opaque op torch.ops.pdserve.paged_attention
    (CUDA's compiled decode and prefill); its arguments reach the same kernels as a direct call."""
    layout = KVLayout("m", 1, 2, 16, 4, "float32", 8)
    pair = [KVCache(layout, 2), KVCache(layout, 2)]
    for i, seg in pair[0].segments.items():
        seg.normal_()
        pair[1].segments[i].copy_(seg)
    backends = [TritonPagedAttention(c, 4, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=64) for c in pair]
    seqs = [SeqSlice(0, 5, 9, (0, 1, 2)), SeqSlice(5, 1, 7, (3, 4))]
    for b in backends:
        b.prepare(seqs, [1] * 6, [4, 5, 6, 7, 8, 6], [4, 5])
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    head_sinks = torch.randn(4) if sinks else None
    direct = backends[0]._forward(0, q, k, v, 0.25, 3, softcap, head_sinks)
    op = torch.ops.pdserve.paged_attention(q, k, v, backends[1].backend_id, 0, 0.25, 3, float(softcap or 0.0),
                                           head_sinks)
    assert torch.equal(direct, op)
    assert all(torch.equal(pair[0].segments[i], pair[1].segments[i]) for i in pair[0].segments)


@ONCE
@pytest.mark.parametrize("kernel", ["general", "split"])
def test_padded_decode_rows_write_nothing(kernel):
    layout = KVLayout("m", 1, 2, 16, 4, "float32", 8)
    cache = KVCache(layout, 1)
    before = cache.segments[0].clone()
    fast = TritonPagedAttention(cache, 4, max_num_batched_tokens=8, max_num_seqs=8, max_model_len=32)
    fast.decode_kernel = kernel
    ids, pos, _ = fast.prepare([], [], [], None, pad_to=4)
    assert ids.shape == (1, 4)
    if kernel == "general":  # padding rows are the general kernel's query blocks...
        assert fast.num_qblocks == 4 and fast.step_decode is None
    else:  # ...or, all rows being decode rows, the split kernel's
        assert fast.num_qblocks == 0 and fast.step_decode.rows == 4
    out = fast.forward(0, torch.randn(1, 4, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), 0.25, None)
    assert torch.equal(cache.segments[0], before)
    assert torch.equal(out, torch.zeros_like(out))  # no context: zero output, no NaN


@shallow_stack
@pytest.mark.parametrize("family", ["qwen2", "gemma3_text", "gemma2", "gpt_oss"])  # gemma3_text: windows on
# some layers only; gemma2: attention logits capped (and windows); gpt_oss: attention sinks (and windows)
def test_engine_on_triton_backend_matches_generate(tiny_checkpoint, family):
    model_dir = tiny_checkpoint(family)
    prompts = PROMPTS[:3]
    engine = make_engine(model_dir, attention_backend="triton", max_num_batched_tokens=16, blocks_per_segment=4)
    assert type(engine.runner.backend).__name__ == "TritonPagedAttention"
    got = run_all(engine, prompts, sampling=GREEDY)
    assert got == {f"r{i}": hf_greedy(model_dir, p, GREEDY.max_tokens) for i, p in enumerate(prompts)}
    assert_all_blocks_free(engine)


@shallow_stack
def test_padded_decode_steps_match_generate(tiny_checkpoint):
    """The CUDA-graph path's inputs without the graph: decode steps padded to capture sizes run
    eagerly over the same fixed buffers (what a replay reads) give generate's tokens. With async
    scheduling the new tokens reach those buffers on the device only (TokenFill)."""
    from workers.engine.argmax import greedy_argmax
    from workers.engine.cuda_graphs import DecodeGraphs

    class EagerPadded(DecodeGraphs):
        def _replay(self, size, ids, pos):  # with the graph's argmax: greedy rows take its tokens
            assert ids.shape[1] == size
            logits = self._forward(ids, pos)
            return logits, greedy_argmax(logits)

    model_dir = tiny_checkpoint("llama")
    engine = make_engine(model_dir, attention_backend="triton", max_num_seqs=5, blocks_per_segment=4)
    engine.runner.graphs = EagerPadded(engine.runner.model, engine.runner.backend, [1, 2, 4, 5])
    got = run_all(engine, PROMPTS)
    assert engine.runner.graphs.num_replays > 0
    assert (engine.num_overlapped_steps > 0) == engine.async_scheduling
    assert got == {f"r{i}": hf_greedy(model_dir, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
    assert_all_blocks_free(engine)


@ONCE
@pytest.mark.parametrize("cfg", [(2, 2048, 4), (16, 256, 4), (8, 1024, 8), (16, 32, 4)])
def test_gemv_matches_linear(cfg):
    """The batch-1 GEMV op (workers/engine/gemv.py) == F.linear on odd shapes (rows and columns not
    multiples of the tile), with and without bias; inputs of more than one row keep F.linear."""
    from workers.engine import gemv

    gemv._register_op()
    gen = torch.Generator().manual_seed(1)
    for n, k in ((37, 300), (130, 1030), (5, 7)):
        w, b = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        x = torch.randn(1, 1, k, generator=gen)
        for bias in (None, b):
            got = gemv.linear(x, w, bias, cfg)
            assert got.shape == (1, 1, n)
            torch.testing.assert_close(got, torch.nn.functional.linear(x, w, bias), rtol=1e-4, atol=1e-4)
    two = torch.randn(1, 2, 300, generator=gen)  # two rows: F.linear, the GEMV op is not called
    w = torch.randn(37, 300, generator=gen)
    assert torch.equal(gemv.linear(two, w, None, cfg), torch.nn.functional.linear(two, w))


@ONCE
def test_greedy_argmax_matches_torch():
    """The decode graphs' argmax (workers/engine/argmax.py) == torch.argmax row by row: ties (the
    first index, in one chunk and across chunks), -inf rows, NaNs (the first one wins, as torch
    orders them above everything), fp32 and bf16, a vocabulary that is not a multiple of the chunk,
    a single chunk; bad shapes are refused."""
    from workers.engine.argmax import greedy_argmax

    gen = torch.Generator().manual_seed(3)
    for cols, block in ((1000, 64), (384, 4096), (130, 16), (4096, 256)):
        x = torch.randn(9, cols, generator=gen)
        x[1, 5] = x[1, cols - 3] = 50.0  # a tie across chunks: the first index
        x[2, 7] = x[2, 8] = 60.0  # a tie inside one chunk
        x[3] = float("-inf")  # nothing but -inf: index 0
        x[4, cols // 2] = float("nan")  # a NaN wins over the max
        x[4, 0] = 70.0
        x[5, cols - 1] = x[5, cols // 3] = float("nan")  # two NaNs: the first
        x[6, cols - 1] = float("inf")
        x[7] = x[7].round()  # many ties
        for t in (x, x.to(torch.bfloat16)):
            got = greedy_argmax(t, block=block)
            assert got.dtype == torch.int64
            assert got.tolist() == t.argmax(dim=-1).tolist(), (cols, block, t.dtype)
    wide = torch.randn(3, 2000, generator=gen)
    assert greedy_argmax(wide[:, :1500]).tolist() == wide[:, :1500].argmax(-1).tolist()  # row stride != cols
    assert greedy_argmax(torch.empty(0, 10)).numel() == 0
    for bad in (torch.randn(4), torch.randn(10, 4).t()):
        with pytest.raises(ValueError, match="greedy_argmax"):
            greedy_argmax(bad)


@shallow_stack
def test_engine_with_gemv_projections_matches_generate(tiny_checkpoint):
    """Every projection of a tiny Llama (the fused q|k|v and gate|up groups, the plain o, down and
    lm_head Linears) switched to the GEMV, as gemv.choose() switches them on a GPU: batch-1 decode
    steps run it and the tokens are generate's."""
    from workers.engine import gemv

    gemv._register_op()
    model_dir = tiny_checkpoint("llama")
    engine = make_engine(model_dir, attention_backend="triton", fuse_projections=True, blocks_per_segment=4)
    layers = gemv.projections(engine.runner.model)
    kinds = {type(m).__name__ for m in layers}
    assert kinds == {"FusedLinear", "Linear"}, kinds
    for m in layers:
        gemv.use(m, (128, 128, 4))  # large tiles: few programs for the interpreter to run
    calls = []
    real = torch.ops.pdserve.gemv

    class Counting:  # counts the op's calls without changing them
        def __call__(self, *a):
            calls.append(a[1].shape)
            return real(*a)

    torch.ops.pdserve.gemv = Counting()
    try:
        prompt = PROMPTS[0]
        got = run_all(engine, [prompt], sampling=GREEDY)
    finally:
        torch.ops.pdserve.gemv = real
    assert got == {"r0": hf_greedy(model_dir, prompt, GREEDY.max_tokens)}
    assert len(calls) >= len(layers) * (GREEDY.max_tokens - 1)  # every decode step, every layer
    assert_all_blocks_free(engine)


@shallow_stack
def test_padded_general_steps_match_generate(tiny_checkpoint):
    """What compile_prefill runs (ModelRunner.pad_general, here without the compiler): steps padded
    to >= 2 tokens and >= 2 logits rows give generate's tokens, for a 1-token prompt and for
    chunked prompts whose middle chunks want no logits; the start-up warm-up on all-padding steps
    writes no KV and leaves every block free."""
    model_dir = tiny_checkpoint("llama")
    engine = make_engine(model_dir, attention_backend="triton", max_num_batched_tokens=8, max_num_seqs=4,
                         blocks_per_segment=4)
    runner = engine.runner
    before = {i: seg.clone() for i, seg in engine.kv_cache.segments.items()}
    runner.warm_up_general()
    assert all(torch.equal(before[i], seg) for i, seg in engine.kv_cache.segments.items())
    assert_all_blocks_free(engine)
    runner.pad_general = True
    calls = []
    real = runner.backend.prepare

    def spy(seqs, input_ids, positions, logits_indices=None, pad_to=None):
        calls.append((len(input_ids), pad_to, len(logits_indices or [])))
        return real(seqs, input_ids, positions, logits_indices, pad_to=pad_to)

    runner.backend.prepare = spy
    execute, shapes = runner.execute, []

    def checked(input_ids, positions, seqs, logits_indices, *a, **kw):
        out = execute(input_ids, positions, seqs, logits_indices, *a, **kw)
        shapes.append((out.shape[0], len(logits_indices)))
        return out

    runner.execute = checked
    prompts = [PROMPTS[0][:1], PROMPTS[2]]  # one token; 30 tokens in 8-token chunks (it ends last, alone)
    got = run_all(engine, prompts, sampling=GREEDY)
    assert got == {f"r{i}": hf_greedy(model_dir, p, GREEDY.max_tokens) for i, p in enumerate(prompts)}
    assert all(n_logits >= 2 for _, _, n_logits in calls)
    assert any(pad_to == 2 for _, pad_to, _ in calls)  # a 1-token step ran padded
    assert shapes and all(rows == wanted for rows, wanted in shapes)  # padding rows never reach the sampler
    assert_all_blocks_free(engine)


@shallow_stack
@pytest.mark.parametrize("scheduling", ["async"])  # one mode (~50 s of interpreter): the graphs' TokenFill path
@pytest.mark.parametrize("family,fuse,max_batch", [("llama", True, 3), ("qwen3", False, 1), ("mistral", True, 1),
                                                   ("qwen2", False, 2)])
def test_engine_fused_decode_matches_generate(tiny_checkpoint, scheduling, family, fuse, max_batch):
    """engine.fused_decode's kernels (workers/engine/fused_decode.py) for decode steps of up to
    ``max_batch`` rows (the GEMV over each row), run eagerly over the graphs'
    padded inputs as DecodeGraphs would capture them (larger steps take the model's forward):
    generate's tokens for Llama (fused q|k|v and gate|up), Qwen3 (q/k norms, separate projections),
    Mistral (sliding window) and Qwen2 (q|k|v bias)."""
    from workers.engine.argmax import greedy_argmax
    from workers.engine.cuda_graphs import DecodeGraphs
    from workers.engine.fused_decode import FusedDecode, supported

    class EagerPadded(DecodeGraphs):
        def _replay(self, size, ids, pos):
            logits = self.forward_for(size)(ids, pos)
            return logits, greedy_argmax(logits)

    model_dir = tiny_checkpoint(family)
    engine = make_engine(model_dir, attention_backend="triton", max_num_seqs=3, blocks_per_segment=4,
                         fuse_projections=fuse)
    runner = engine.runner
    assert supported(runner.model, family) is None
    fused = FusedDecode(runner.model, runner.backend, max_batch=max_batch)
    runner.graphs = EagerPadded(runner.model, runner.backend, [1, 2, 3], fused=fused)
    want = {i: hf_greedy(model_dir, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS[:3])}
    for group in ([0], [1, 2], [0, 1, 2])[:3 if max_batch >= 3 else 2]:  # decode batches of 1, 2 (and 3)
        before = fused.num_calls
        got = run_all(engine, [PROMPTS[i] for i in group])
        assert got == {f"r{j}": want[i] for j, i in enumerate(group)}, group
        assert (fused.num_calls > before) == (len(group) <= max_batch), group
        assert_all_blocks_free(engine)


@ONCE
def test_fused_projections_on_ragged_shapes_match_torch(scheduling):
    """The fused step's GEMV (1 and 3 rows) on shapes no tile divides (outputs past the last full tile read as zeros, a K chunk past the end is
    masked): plain + bias, RMSNorm + SiLU*mul (GLU), and a residual added in place, against torch in
    fp32."""
    import types

    from workers.engine.fused_decode import TILES, FusedDecode

    f = FusedDecode.__new__(FusedDecode)  # the projections alone: no model
    f.tiles, f.pdl, f.interpret = dict(TILES), False, True
    f.cos = f.sin = torch.zeros(4, 8)
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 3):
        for n, k in ((100, 72), (40, 200)):
            x, w, w2 = (torch.randn(*shape, generator=gen) for shape in ((rows, k), (n, k), (n, k)))
            b, b2, g = (torch.randn(size, generator=gen) for size in (n, n, k))
            norm = types.SimpleNamespace(weight=g, variance_epsilon=1e-6)
            xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g
            y = torch.empty(rows, n)
            f._gemv(x, w, b, y)
            torch.testing.assert_close(y, x @ w.T + b, rtol=1e-4, atol=1e-4)
            f._gemv(x, w, b, y, norm=norm, glu=(w2, b2))
            want = torch.nn.functional.silu(xn @ w.T + b) * (xn @ w2.T + b2)
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
            res = torch.randn(rows, n, generator=gen)
            y = res.clone()
            f._gemv(x, w, None, y, residual=y)  # the residual stream, updated in place
            torch.testing.assert_close(y, res + x @ w.T, rtol=1e-4, atol=1e-4)
