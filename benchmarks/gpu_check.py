"""GPU correctness of the engine's fast path (Triton kernels + decode CUDA graphs). Run on a CUDA
machine (CI has none): exits non-zero, naming the failed checks, if any check fails.

    python3 benchmarks/gpu_check.py [--skip-1b]

Checks:
  kernels      Triton backend vs the torch reference backend, bf16, random data, blocks in 3 segments,
               mixed prefill/decode steps, GQA, sliding window, split_diagonal off and on: relative
               error, identical cache writes; decode-only steps on the split-KV kernel
               (benchmarks/split_decode_check.py): split counts, merges, fused write, repeatability,
               CUDA-graph replay of padded steps; the decode graphs' argmax kernel vs torch.argmax
  argmax       that argmax check alone (benchmarks/gpu_check_argmax.py)
  fp32-exact   tiny llama/mistral/qwen2/qwen3 in fp32 on CUDA, token-identical to transformers'
               generate on CUDA: whole and chunked prefill, prefix-cache hits, preemption
  more-families  fp32-exact on the further families of tests/tiny_models.py (MORE_FAMILIES, or
               --families), and once more each with the decode and prefill steps compiled
  capped-triton  Gemma 2 (attention logit cap): the Triton and torch attention backends
               token-identical on CUDA, then fp32-exact's cases (compiled too) through Triton
  moe-bf16     tiny Mixtral / Qwen3-MoE / gpt-oss in bf16: eager, graphs, compiled decode, compiled prefill,
               the CUDA defaults, each as near the fp32 model's greedy tokens as transformers'
               bf16 generate (24 prompts, 2 of slack)
  graphs       decode through CUDA graphs == the same engine without graphs, token for token; each
               graph's own argmax == torch.argmax of its logits
  split        prefill on engine A, copy the blocks to engine B, decode on B == colocated
  bf16-1b      Llama-3.2-1B-shaped random model, bf16: greedy output close to generate by vLLM's
               rule (where sequences diverge, each side's token is in the other's top-5); then the
               same engine (compiled CUDA graphs) with async scheduling == synchronous, token for
               token: greedy with mixed max_tokens, and seeded top-k/top-p sampling with logprobs
               (benchmarks/gpu_check_bf16.py)
  fused        engine.fuse_projections (q|k|v, gate|up in one GEMM each) on tiny fp32 models with
               compiled CUDA graphs: token-identical to generate
  bf16-1b-fused  the bf16-1b checks again with fuse_projections
  gemv         engine.gemv (opt-in): tiny fp32 models with every projection on the Triton GEMV,
               eager batch-1 decode steps: token-identical to generate
  bf16-1b-gemv   the bf16-1b checks with fuse_projections + engine.gemv (gemv.choose() at load)
  compiled-prefill  engine.compile_prefill (torch.compile of prefill and mixed steps, symbolic token
               count) on tiny fp32 models, whole and 5-token chunked prefill: token-identical to generate
  sampler      the batched device sampler == the per-request reference sampler on CUDA (seeded
               temperature/top-k/top-p/greedy mixes, logprobs; vocab 257 and 128256)
  prompt-logprobs, prompt-logprobs-1b  benchmarks/gpu_check_prompt_logprobs.py
  async        tiny llama/mistral/qwen2/qwen3 fp32 on CUDA (CUDA graphs): async scheduling ==
               synchronous, token for token (whole and chunked prefill, preemption, stop tokens at
               different steps, an abort while a step is in flight, seeded sampling), every block
               back in the pool, and steps really left in flight
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# run as a script this module is __main__: the check modules' "from benchmarks.gpu_check import ..."
# must get this one (its ENGINE_EXTRA as main() sets it, one _HF cache), not a second copy
sys.modules.setdefault("benchmarks.gpu_check", sys.modules[__name__])

from benchmarks.gpu_check_argmax import check_argmax  # noqa: E402
from benchmarks.gpu_check_bf16 import check_bf16_1b  # noqa: E402
from benchmarks.gpu_check_families import (_capped, check_capped_triton, check_fp32_exact,  # noqa: E402
                                           check_moe_bf16, check_mxfp4)
from benchmarks.gpu_check_prompt_logprobs import check_prompt_logprobs, check_prompt_logprobs_1b  # noqa: E402
from kv_transfer.layout import KVLayout  # noqa: E402
from tests.tiny_models import FAMILIES, MORE_FAMILIES, build_tiny_checkpoint  # noqa: E402
from tests.workers.engine.helpers import GREEDY, PROMPTS, collect, drain, run_all  # noqa: E402
from workers.engine.attention import SeqSlice, TorchPagedAttention  # noqa: E402
from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.kv_cache import KVCache  # noqa: E402
from workers.engine.model_runner import load_causal_lm, load_hf_config  # noqa: E402
from workers.protocol import SamplingParams  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "pdserve-gpu-check"


# engine settings every check's engines take (--tune-batch1: engine.tune_batch1 on)
ENGINE_EXTRA: dict = {}


def make(model_dir, dtype="float32", **kw) -> Engine:
    # compile_decode and compile_prefill off by default here: each engine would compile its own
    # model (the 'graphs', 'bf16-1b' and 'compiled-prefill' checks turn them on)
    cfg = dict(block_size=4, num_kv_blocks=128, blocks_per_segment=16, max_num_batched_tokens=64, max_num_seqs=8,
               compile_decode=False, compile_prefill=False, **ENGINE_EXTRA)
    cfg.update(kw)
    return Engine(ModelConfig(device="cuda", dtype=dtype), EngineConfig(**cfg), model_dir)


def hf_generate(model_dir, prompt, n, dtype="float32", with_scores=False):
    key = (model_dir, dtype)
    if key not in _HF:
        # a capped model's reference is transformers' eager attention: transformers 5.17 (the device
        # image's) picks SDPA for Gemma 2, which drops the cap (twenty-first session: every prompt
        # differed from the capped engine; 5.17 eager == 5.24 == the engine on the CPU)
        kw = {"attn_implementation": "eager"} if _capped(model_dir) else {}
        # MXFP4 experts dequantized to the dtype, as the engine loads them: transformers 5.17
        # dequantizes them to bf16 whatever the dtype (a dtype mismatch in fp32)
        _HF[key] = load_causal_lm(model_dir, load_hf_config(model_dir), getattr(torch, dtype), **kw).cuda().eval()
    with torch.inference_mode():
        out = _HF[key].generate(torch.tensor([prompt], device="cuda"), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ids = out.sequences[0, len(prompt):].tolist()
    return (ids, [s[0].topk(5).indices.tolist() for s in out.scores]) if with_scores else ids


_HF: dict = {}


def check_kernels() -> dict:
    from workers.engine.triton_attention import TritonPagedAttention

    worst = 0.0
    # Phi-3-mini's heads, Gemma-2B's (window: Gemma 3's), a capped one (Gemma 2's tanh cap, low: it
    # bites), gpt-oss's (64 query heads of 64 over 8 KV heads, attention sinks; the 301-key context
    # is two chunks of the split decode: the sinks go in its merge)
    for hq, hkv, dim, window, cap, sinks in [(32, 8, 64, None, None, False), (8, 2, 128, None, None, False),
                                             (4, 4, 64, 7, None, False), (32, 32, 96, None, None, False),
                                             (8, 1, 256, 7, None, False), (8, 2, 128, 7, 1.0, False),
                                             (64, 8, 64, None, None, True), (64, 8, 64, 7, None, True)]:
        layout = KVLayout("m", 2, hkv, dim, 16, "bfloat16", 16)
        a, b = KVCache(layout, 3, "cuda"), KVCache(layout, 3, "cuda")
        for i in a.segments:
            a.segments[i].normal_()
            b.segments[i].copy_(a.segments[i])
        ref, fast = TorchPagedAttention(a), TritonPagedAttention(b, hq, 512, 16, 512)
        rng = random.Random(hq)
        free = list(range(a.num_blocks))
        rng.shuffle(free)
        seqs, ids, pos, t = [], [], [], 0
        for cached, new in [(40, 1), (0, 70), (33, 20), (100, 1), (5, 1), (300, 1)]:
            ctx = cached + new
            seqs.append(SeqSlice(t, new, ctx, tuple(free.pop() for _ in range(-(-ctx // 16)))))
            ids += [1] * new
            pos += list(range(cached, ctx))
            t += new
        ref.prepare(seqs, ids, pos, [t - 1])
        fast.prepare(seqs, ids, pos, [t - 1])
        for layer in range(2):
            head_sinks = torch.randn(hq, device="cuda", dtype=torch.bfloat16) * 2 if sinks else None
            q = torch.randn(1, hq, t, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, hkv, t, dim, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, hkv, t, dim, device="cuda", dtype=torch.bfloat16)
            want = ref.forward(layer, q.float(), k, v, dim ** -0.5, window, cap,
                               None if head_sinks is None else head_sinks.float()).float()
            for split in (False, True):  # split_diagonal: unmasked tiles below the diagonal
                fast.split_diagonal = split
                got = fast.forward(layer, q, k, v, dim ** -0.5, window, cap, head_sinks).float()
                if not torch.isfinite(got).all():
                    raise AssertionError(f"non-finite attention output (split_diagonal={split})")
                worst = max(worst, ((got - want).norm() / want.norm()).item())
        for i in a.segments:
            if not torch.equal(a.segments[i], b.segments[i]):
                raise AssertionError("cache writes differ from the reference")
    if worst > 1e-2:
        raise AssertionError(f"relative error {worst:.2e} > 1e-2")
    from benchmarks.split_decode_check import check_split_decode

    return {"max_rel_err": round(worst, 5), "argmax_cases": check_argmax(), **check_split_decode()}


def check_graphs() -> dict:
    d = str(build_tiny_checkpoint("qwen3", CACHE / "tiny-qwen3"))
    with_graphs = make(d, dtype="bfloat16", compile_decode=True)
    without = make(d, dtype="bfloat16", cuda_graphs=False)
    if with_graphs.runner.graphs is None or without.runner.graphs is not None:
        raise AssertionError("cuda_graphs config not honoured")
    prompts = PROMPTS + [list(range(200, 260)), [3] * 41, list(range(70, 75))]
    a, b = run_all(with_graphs, prompts), run_all(without, prompts)
    if a != b:
        raise AssertionError("compiled CUDA-graph decode differs from eager decode")
    # each graph's own argmax vs torch's of its logits, replayed on all-padding rows (they write no
    # KV): the graphs share one memory pool, so only the last replay's outputs are its own
    backend = with_graphs.runner.backend
    for size, (graph, logits, argmax) in with_graphs.runner.graphs.graphs.items():
        backend.prepare([], [], [], None, pad_to=size)
        graph.replay()
        if not torch.equal(argmax, logits.argmax(dim=-1)):
            raise AssertionError(f"the batch-{size} graph's argmax differs from torch.argmax of its logits")
    return {"graph_replays": with_graphs.runner.graphs.num_replays}


def check_split() -> dict:
    d = str(build_tiny_checkpoint("llama", CACHE / "tiny-llama"))
    colocated = run_all(make(d), PROMPTS)
    a, b = make(d), make(d, blocks_per_segment=8)
    for i, p in enumerate(PROMPTS):
        a.add_request(f"r{i}", p, GREEDY, prefill_only=True)
    handles = {}
    while a.has_work():
        handles.update({h.request_id: h for h in a.step().handles})
    out = {}
    for i, p in enumerate(PROMPTS):
        h = handles[f"r{i}"]
        res = b.reserve_import(h.request_id, p, GREEDY)
        n = res.num_local_cached_blocks
        b.kv_cache.write_blocks(list(res.block_ids[n:]), a.kv_cache.read_blocks(list(h.block_ids[n:])))
        a.release_handle(h.request_id)
        out[h.request_id] = list(b.commit_import(h.request_id, h.first_token_id).token_ids)
    drain(b, out)
    if out != colocated:
        raise AssertionError("disaggregated decode differs from colocated")
    return {"requests": len(out)}


def check_sampler() -> dict:
    from tests.workers.engine.sampler_reference import check_same

    cuda = torch.device("cuda")
    rows = check_same(cuda, vocab=257, trials=120) + check_same(cuda, vocab=128256, trials=30, seed=1)
    return {"rows_compared": rows}


def differing(a: dict, b: dict, lp_tol: float) -> list[str]:
    """Requests whose (tokens, finish, error) differ, or whose logprobs differ by more than lp_tol
    (a stop token's dropped slot changes a later step's batch, and fp32 kernels of another batch
    shape may round differently in the last bits: tokens must still be identical)."""
    bad = []
    for k in a:
        (*head_a, lp_a, top_a), (*head_b, lp_b, top_b) = a[k], b[k]
        same_lp = len(lp_a) == len(lp_b) and all(abs(x - y) <= lp_tol for x, y in zip(lp_a, lp_b))
        same_top = [[t for t, _ in s] for s in top_a] == [[t for t, _ in s] for s in top_b]
        if head_a != head_b or not same_lp or not same_top:
            bad.append(k)
    return bad


def check_async() -> dict:
    mismatches, overlapped = [], 0
    for family in FAMILIES:
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        base = run_all(make(d, async_scheduling=False), PROMPTS)
        reqs = {}
        for i, p in enumerate(PROMPTS):
            reqs[f"len{i}"] = (p, SamplingParams(max_tokens=1 + 3 * i, temperature=0, ignore_eos=True))
            reqs[f"stop{i}"] = (p, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(base[f"r{i}"][2 * i],)))
            reqs[f"seed{i}"] = (p, SamplingParams(max_tokens=9, temperature=1.2, top_k=[0, 5][i % 2],
                                                 top_p=[1.0, 0.9][i % 2], seed=100 + i, ignore_eos=True, logprobs=True))
        for label, kw in [("whole", {}), ("chunked-5", dict(max_num_batched_tokens=16, max_num_seqs=16)),
                          ("preempt", dict(num_kv_blocks=24, blocks_per_segment=4, max_num_seqs=16))]:
            kw = {"max_num_seqs": 16, **kw}
            sync_e, async_e = make(d, async_scheduling=False, **kw), make(d, async_scheduling=True, **kw)
            bad = differing(collect(sync_e, reqs, True), collect(async_e, reqs, True), lp_tol=1e-4)
            if bad:
                mismatches.append(f"{family}/{label}: {bad}")
            for e in (sync_e, async_e):
                st = e.stats()
                if st.num_used_blocks or st.num_free_blocks != st.num_target_blocks:
                    mismatches.append(f"{family}/{label}: blocks leaked ({st})")
            if async_e.num_overlapped_steps == 0 or async_e.runner.graphs.num_replays == 0:
                mismatches.append(f"{family}/{label}: nothing overlapped or no graph replay")
            overlapped += async_e.num_overlapped_steps
        # abort while a step is in flight: the others are unchanged, nothing leaks
        e = make(d, async_scheduling=True)
        out = {f"r{i}": [] for i in range(len(PROMPTS))}
        for i, p in enumerate(PROMPTS):
            e.add_request(f"r{i}", p, GREEDY)
        for _ in range(4):
            for delta in e.step().deltas:
                out[delta.request_id] += delta.token_ids
        e.abort("r1")
        drain(e, out)
        if {k: v for k, v in out.items() if k != "r1"} != {k: v for k, v in base.items() if k != "r1"}:
            mismatches.append(f"{family}/abort: others changed")
        if e.stats().num_used_blocks:
            mismatches.append(f"{family}/abort: blocks leaked")
    if mismatches:
        raise AssertionError(f"async scheduling differs from synchronous: {mismatches}")
    return {"families": list(FAMILIES), "cases": 4, "overlapped_steps": overlapped}


def check_fused() -> dict:
    """fuse_projections on CUDA: tiny fp32 models token-identical to generate (graphs, async)."""
    bad = []
    for family in FAMILIES:
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        ref = {f"r{i}": hf_generate(d, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
        if run_all(make(d, fuse_projections=True, compile_decode=True), PROMPTS) != ref:
            bad.append(family)
    if bad:
        raise AssertionError(f"fused projections not token-identical to generate: {bad}")
    return {"families": list(FAMILIES)}


def check_gemv() -> dict:
    """engine.gemv (opt-in) on CUDA: tiny fp32 models, fused projections, every projection forced
    onto the GEMV, prompts one at a time (batch-1 decode, eager): token-identical to generate."""
    from workers.engine import gemv

    bad, layers = [], 0
    for family in FAMILIES:
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        ref = {f"r{i}": hf_generate(d, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
        e = make(d, fuse_projections=True, cuda_graphs=False)  # eager: the forced choice below applies
        for m in gemv.projections(e.runner.model):  # every layer on the GEMV, not only where it times faster
            gemv.use(m, gemv.CONFIGS[0])
            layers += 1
        gemv._register_op()
        for i, p in enumerate(PROMPTS):  # one at a time: every decode step is batch 1
            if run_all(e, [p])["r0"] != ref[f"r{i}"]:
                bad.append(f"{family}/r{i}")
    if bad:
        raise AssertionError(f"GEMV projections not token-identical to generate: {bad}")
    return {"families": list(FAMILIES), "layers_on_gemv": layers}


def check_compiled_prefill() -> dict:
    """compile_prefill on CUDA: tiny fp32 models token-identical to generate, whole prompts and
    5-token chunks (steps of many sizes, with and without logits rows), and nothing compiled after
    the start-up warm-up (torch._dynamo's unique-graph count unchanged while serving: a recompile
    mid-serving would stall every request for ~30 s)."""
    from torch._dynamo.utils import counters

    bad, warmups = [], []
    for family in FAMILIES:
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        ref = {f"r{i}": hf_generate(d, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
        for label, kw in (("whole", {}), ("chunked-5", dict(max_num_batched_tokens=5, max_num_seqs=5))):
            e = make(d, compile_prefill=True, **kw)
            warmups.append(round(e.runner.general_warmup_s or -1, 2))
            graphs = counters["stats"]["unique_graphs"]
            # a 1-token prompt too: the smallest step a compiled general path can see
            if run_all(e, PROMPTS) != ref or not run_all(e, [[7]], prefix="one")["one0"]:
                bad.append(f"{family}/{label}")
            if counters["stats"]["unique_graphs"] != graphs:
                bad.append(f"{family}/{label}: {counters['stats']['unique_graphs'] - graphs} graphs compiled "
                           "after the warm-up")
    if bad:
        raise AssertionError(f"compiled prefill not token-identical to generate / recompiled: {bad}")
    return {"families": list(FAMILIES), "cases": 2, "warmup_s": warmups}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--only", help="comma list of checks to run (default: all)")
    ap.add_argument("--families", help="comma list: the families more-families runs (default: all of MORE_FAMILIES)")
    ap.add_argument("--tune-batch1", action="store_true", help="engine.tune_batch1 on in every check's engines")
    ap.add_argument("--fused-decode", type=int, default=0, metavar="MAX_BATCH",
                    help="engine.fused_decode: true with this max batch in every check's engines (default: the "
                         "config's auto, batch 1)")
    ap.add_argument("--no-fused-decode", action="store_true", help="engine.fused_decode off in every check's engines")
    args = ap.parse_args()
    if args.tune_batch1:
        ENGINE_EXTRA["tune_batch1"] = True
    if args.fused_decode:
        ENGINE_EXTRA.update(fused_decode=True, fused_decode_max_batch=args.fused_decode)
    if args.no_fused_decode:
        ENGINE_EXTRA["fused_decode"] = False
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device: run this on a GPU machine"}))
        return 2
    checks = {"kernels": check_kernels, "argmax": lambda: {"cases": check_argmax()}, "sampler": check_sampler, "fp32-exact": check_fp32_exact,
              "more-families": lambda: check_fp32_exact(args.families.split(",") if args.families else MORE_FAMILIES,
                                                        compiled=True),
              "graphs": check_graphs, "moe-bf16": check_moe_bf16, "capped-triton": check_capped_triton, "mxfp4": check_mxfp4,
              "split": check_split, "async": check_async, "fused": check_fused,
              "compiled-prefill": check_compiled_prefill, "prompt-logprobs": check_prompt_logprobs,
              "prompt-logprobs-1b": check_prompt_logprobs_1b,
              "gemv": check_gemv, "bf16-1b": check_bf16_1b, "bf16-1b-fused": lambda: check_bf16_1b(fuse=True),
              "bf16-1b-gemv": lambda: check_bf16_1b(fuse=True, use_gemv=True)}
    if args.skip_1b:
        del checks["bf16-1b"], checks["bf16-1b-fused"], checks["bf16-1b-gemv"], checks["prompt-logprobs-1b"]
    if args.only:
        unknown = set(args.only.split(",")) - set(checks)
        if unknown:
            print(json.dumps({"error": f"unknown checks {sorted(unknown)}; checks are {sorted(checks)}"}))
            return 2
        checks = {k: v for k, v in checks.items() if k in args.only.split(",")}
    results, failed = {}, []
    for name, fn in checks.items():
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as e:  # report every check, then fail at the end
            traceback.print_exc()
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
            failed.append(name)
    print(json.dumps({"gpu_check": results, "card": torch.cuda.get_device_name(), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
