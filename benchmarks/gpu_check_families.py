"""gpu_check.py's checks of model families (its module imports this one): each family token-identical
to transformers' generate in fp32 (fp32-exact, more-families), mixture-of-experts in bf16 (moe-bf16)
and Gemma 2's attention logit cap through the Triton kernels (capped-triton). CUDA only."""

from __future__ import annotations

import sys

from benchmarks.gpu_check_bf16 import greedy_with_top5, outside_top5
from tests.tiny_models import FAMILIES, build_tiny_checkpoint
from tests.workers.engine.helpers import GREEDY, PROMPTS, run_all


def _capped(model_dir: str) -> bool:
    """The checkpoint caps its attention logits (Gemma 2)."""
    from transformers import AutoConfig

    from workers.engine.model_runner import attention_logit_cap

    return attention_logit_cap(AutoConfig.from_pretrained(model_dir)) is not None


def check_fp32_exact(families=FAMILIES, compiled: bool = False) -> dict:
    """compiled: also a run with the decode and prefill steps compiled (the CUDA defaults; each
    compiles). Reports which families decode through CUDA graphs (engine.cuda_graphs auto turns
    them off where the model's forward cannot be captured; then true must be an error)."""
    from benchmarks.gpu_check import CACHE, hf_generate, make  # its module imports this one
    from workers.engine.model_runner import UnsupportedModelError

    mismatches, graphs_on = [], {}
    for family in families:
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        ref = {f"r{i}": hf_generate(d, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
        cases = [("whole", {}), ("chunked-5", dict(max_num_batched_tokens=5, max_num_seqs=5)),
                 ("preempt", dict(num_kv_blocks=12, blocks_per_segment=4, max_num_seqs=5))]
        if compiled:
            cases.append(("compiled", dict(compile_decode=True, compile_prefill=True)))
        for label, kw in cases:
            e = make(d, **kw)
            graphs_on.setdefault(family, e.runner.graphs is not None)
            if label == "whole" and not graphs_on[family]:
                try:
                    make(d, cuda_graphs=True)
                    mismatches.append(f"{family}: graphs off under auto, but cuda_graphs true did not fail")
                except UnsupportedModelError as err:
                    print(f"fp32-exact {family}: cuda_graphs true refused: {str(err)[:300]}", file=sys.stderr)
            got = run_all(e, PROMPTS)
            if got != ref:
                mismatches.append(f"{family}/{label}")
            if label == "preempt" and e.stats().num_preemptions == 0:
                mismatches.append(f"{family}/preempt: no preemption happened")
            print(f"fp32-exact {family}/{label}: {'same' if got == ref else 'DIFFERS'}", file=sys.stderr, flush=True)
        e = make(d)
        shared = list(range(40, 70))
        run_all(e, [shared + [1, 2]], prefix="a")
        second = run_all(e, [shared + [3, 4, 5]], prefix="b")["b0"]
        if e.stats().prompt_tokens_hit < 28 or second != hf_generate(d, shared + [3, 4, 5], GREEDY.max_tokens):
            mismatches.append(f"{family}/prefix-hit")
    if mismatches:
        raise AssertionError(f"not token-identical to generate: {mismatches}")
    return {"families": list(families), "cases": 5 if compiled else 4,
            "without_graphs": [f for f, on in graphs_on.items() if not on]}


def check_capped_triton() -> dict:
    """Gemma 2 (attention logits capped) through the Triton kernels on CUDA: the Triton and torch
    attention backends token-identical to each other, then fp32-exact's cases (compiled too) to
    generate with eager attention (which keeps the cap; SDPA drops it)."""
    from benchmarks.gpu_check import CACHE, check_fp32_exact, make  # its module imports this one

    d = str(build_tiny_checkpoint("gemma2", CACHE / "tiny-gemma2"))
    prompts = PROMPTS + [list(range(200, 260)), [3] * 41]
    triton_out = run_all(make(d), prompts)
    torch_out = run_all(make(d, attention_backend="torch"), prompts)
    differ = [k for k in torch_out if triton_out[k] != torch_out[k]]
    print(f"capped-triton: triton vs torch backend on CUDA differ in {differ}", file=sys.stderr, flush=True)
    if differ:
        raise AssertionError(f"Triton and torch attention backends differ on CUDA for {differ}")
    return {"backends_identical": len(prompts), **check_fp32_exact(["gemma2"], compiled=True)}


def check_moe_bf16() -> dict:
    """Tiny Mixtral / Qwen3-MoE in bf16 (as served): eager decode without graphs, graphs of the
    modules' forward, compiled decode, and the CUDA defaults (compile_* auto: uncompiled for MoE),
    each against transformers' bf16 generate by the top-5 rule of bf16-1b (where two sequences
    diverge, each side's token is in the other's top-5); the defaults must be token-identical and
    compile_prefill: true is refused. In bf16 a router's top-k flips with the last bit of its
    logits, so the other variants' exact identity is counted, not required."""
    from benchmarks.gpu_check import CACHE, hf_generate, make  # its module imports this one
    from workers.engine.config import EngineConfig
    from workers.engine.model_runner import UnsupportedModelError
    from workers.protocol import SamplingParams

    sp = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True, top_logprobs=5)
    prompts = PROMPTS + [list(range(200, 260)), [3] * 41, list(range(70, 75))]
    out = {}
    for family in ("mixtral", "qwen3_moe"):
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        refs = [hf_generate(d, p, sp.max_tokens, "bfloat16", with_scores=True) for p in prompts]
        # compile_prefill: true gave wrong first tokens here (twenty-first session); it is refused now
        try:
            make(d, dtype="bfloat16", compile_prefill=True)
            raise AssertionError(f"{family}: compile_prefill true on a mixture-of-experts model was not refused")
        except UnsupportedModelError:
            pass
        variants = {"eager": dict(cuda_graphs=False), "graphs": dict(compile_decode=False),
                    "compile_decode": dict(compile_decode=True, compile_prefill=False),
                    "defaults": {k: v for k, v in EngineConfig().model_dump().items()
                                 if k in ("cuda_graphs", "compile_decode", "compile_prefill")}}
        for name, kw in variants.items():
            e = make(d, dtype="bfloat16", **kw)
            got = greedy_with_top5(e, prompts, sp)
            exact, outside = 0, []
            for i, (ref, ref_top) in enumerate(refs):
                ours, our_top = got[f"q{i}"]
                exact += ours == ref
                j = outside_top5(ours, our_top, ref, ref_top)
                if j is not None:
                    outside.append(f"q{i}@{j}")
            out[f"{family}/{name}"] = {"graphs": e.runner.graphs is not None, "compiled": e.runner.compile_decode,
                                       "compiled_prefill": e.runner.compiled_general, "identical": exact,
                                       "prompts": len(prompts), "outside_top5": outside}
            print(f"moe-bf16 {family}/{name}: {out[f'{family}/{name}']}", file=sys.stderr, flush=True)
            del e
    bad = {k: v for k, v in out.items() if v["outside_top5"]
           or (k.endswith("/defaults") and (v["compiled_prefill"] or v["identical"] < v["prompts"]))}
    if bad:
        raise AssertionError(f"outside the top-5 rule: {bad}; all: {out}")
    return out
