"""benchmarks/gpu_check.py's bf16 checks on the Llama-3.2-1B-shaped random model: greedy output close
to transformers' generate by vLLM's rule (where sequences diverge, each side's token is in the
other's top-5), then async == synchronous scheduling on the same compiled-graph engine. CUDA only.
"""

from __future__ import annotations

import torch

from benchmarks.engine import build_model
from tests.workers.engine.helpers import collect
from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.engine import Engine
from workers.protocol import SamplingParams


def greedy_with_top5(e: Engine, prompts: list[list[int]], sp: SamplingParams) -> dict[str, tuple[list, list]]:
    """Request "q<i>" per prompt, run to the end: its (tokens, each step's top-5 token ids)."""
    got = {}
    for i, p in enumerate(prompts):
        e.add_request(f"q{i}", p, sp)
        got[f"q{i}"] = ([], [])
    while e.has_work():
        for delta in e.step().deltas:
            got[delta.request_id][0].extend(delta.token_ids)
            got[delta.request_id][1].extend([[t for t, _ in step] for step in delta.top_logprobs])
    return got


def outside_top5(ours: list[int], our_top: list, theirs: list[int], their_top: list) -> int | None:
    """vLLM's closeness rule: at the first position where the sequences differ, each side's token is
    in the other's top-5. That position when it is not (None: identical or close)."""
    for j, (x, y) in enumerate(zip(ours, theirs)):
        if x != y:
            return j if x not in their_top[j][:5] or y not in our_top[j][:5] else None
    return None


def check_bf16_1b(fuse: bool = False, use_gemv: bool = False) -> dict:
    """The bf16-1b checks (benchmarks/gpu_check.py's list)."""
    from benchmarks.gpu_check import CACHE, ENGINE_EXTRA, hf_generate  # its module imports this one

    d = build_model("llama-1b-shape", CACHE)
    e = Engine(ModelConfig(device="cuda", dtype="bfloat16"),
               EngineConfig(block_size=16, num_kv_blocks=256, blocks_per_segment=64, max_num_batched_tokens=512,
                            max_num_seqs=8, max_model_len=1024, fuse_projections=fuse, gemv=use_gemv,
                            **ENGINE_EXTRA), d)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(10, 128000, (4, 60), generator=g).tolist()
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, top_logprobs=5)
    got = greedy_with_top5(e, prompts, sp)
    async_checks = check_bf16_async(e, prompts)
    exact = 0
    del e
    torch.cuda.empty_cache()
    for i, p in enumerate(prompts):
        (ours, our_top), (theirs, their_top) = got[f"q{i}"], hf_generate(d, p, 24, "bfloat16", with_scores=True)
        exact += ours == theirs
        j = outside_top5(ours, our_top, theirs, their_top)
        if j is not None:
            raise AssertionError(f"prompt {i} diverged at {j}: {ours[j]} vs {theirs[j]}, outside each other's top-5")
    return {"prompts": len(prompts), "identical": exact, **async_checks}


def check_bf16_async(e: Engine, prompts: list[list[int]]) -> dict:
    """The same compiled-graph engine, async vs synchronous scheduling: identical tokens (and
    logprobs). Length finishes only: the batch of every step is then the same in both modes (a
    stop token would leave one extra slot in an async step, and bf16 GEMMs of another padded
    batch size may round differently)."""
    reqs = {}
    for i, p in enumerate(prompts):
        reqs[f"g{i}"] = (p, SamplingParams(max_tokens=8 + 9 * i, temperature=0, ignore_eos=True))
        reqs[f"s{i}"] = (p[::-1], SamplingParams(max_tokens=20, temperature=0.9, top_k=50 * (i % 2), top_p=0.95,
                                                seed=7 + i, ignore_eos=True, logprobs=True, top_logprobs=2))
    got = {}
    for mode in (False, True):
        e.async_scheduling = mode
        e.pool.reset_cache()
        got[mode] = collect(e, reqs, with_logprobs=True)
    if got[True] != got[False]:
        raise AssertionError(f"bf16 async != sync for {[k for k in reqs if got[True][k] != got[False][k]]}")
    return {"async_equal_requests": len(reqs), "overlapped_steps": e.num_overlapped_steps}
