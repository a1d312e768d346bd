"""gpu_check.py's checks of model families (its module imports this one): each family token-identical
to transformers' generate in fp32 (fp32-exact, more-families), mixture-of-experts in bf16 (moe-bf16)
Gemma 2's attention logit cap through the Triton kernels (capped-triton) and gpt-oss's MXFP4
checkpoints dequantized at load (mxfp4). CUDA only."""

from __future__ import annotations

import sys

import torch

from tests.tiny_models import FAMILIES, build_tiny_checkpoint
from tests.workers.engine.helpers import GREEDY, PROMPTS, run_all
from workers.protocol import SamplingParams


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
    """Tiny Mixtral / Qwen3-MoE / gpt-oss in bf16 (as served), each engine variant (eager decode without
    graphs, the modules' graphs, compiled decode, compiled prefill, the CUDA defaults) against the
    fp32 model: transformers' fp32 greedy tokens, 24 random prompts, 6 tokens each. In these tiny
    random models bf16 rounding flips a router's top-k (a near tie between experts) whichever side
    rounds, so bf16 is not held to bf16 generate token for token: a variant must match the fp32
    model as often as transformers' own bf16 generate does, less 2 prompts (first tokens and whole
    sequences). Twenty-second session (benchmarks/moe_compile_probe.py): transformers' compiled
    bf16 forward is as near fp32 as its eager one, while the two differ from each other."""
    from benchmarks.gpu_check import CACHE, hf_generate, make  # its module imports this one
    from workers.engine.config import EngineConfig

    n = 6
    sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 380, (int(torch.randint(5, 90, (1,), generator=g)),), generator=g).tolist()
               for _ in range(24)]
    defaults = {k: v for k, v in EngineConfig().model_dump().items()
                if k in ("cuda_graphs", "compile_decode", "compile_prefill")}
    variants = {"eager": dict(cuda_graphs=False), "graphs": dict(compile_decode=False),
                "compile_decode": dict(compile_decode=True), "compile_prefill": dict(compile_prefill=True),
                "defaults": defaults}
    out, bad = {}, []
    for family in ("mixtral", "qwen3_moe", "gpt_oss"):
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        ref = [hf_generate(d, p, n, "float32") for p in prompts]

        def score(seqs: list[list[int]]) -> dict:
            return {"first": sum(s[0] == r[0] for s, r in zip(seqs, ref)), "whole": sum(s == r for s, r in zip(seqs, ref))}

        base = score([hf_generate(d, p, n, "bfloat16") for p in prompts])
        out[f"{family}/hf-bf16"] = base
        for name, kw in variants.items():
            e = make(d, dtype="bfloat16", **kw)
            got = run_all(e, prompts, sp, prefix="q")
            s = {**score([got[f"q{i}"] for i in range(len(prompts))]), "graphs": e.runner.graphs is not None,
                 "compiled_decode": e.runner.compile_decode, "compiled_prefill": e.runner.compiled_general}
            out[f"{family}/{name}"] = s
            print(f"moe-bf16 {family}/{name}: {s} (transformers bf16: {base}, of {len(prompts)})",
                  file=sys.stderr, flush=True)
            if s["first"] < base["first"] - 2 or s["whole"] < base["whole"] - 2:
                bad.append(f"{family}/{name}")
            del e
    if bad:
        raise AssertionError(f"further from the fp32 model than transformers' bf16 generate: {bad}; all: {out}")
    return {"prompts": 24, **out}


def check_mxfp4() -> dict:
    """gpt-oss as released (its experts' weights in MXFP4), dequantized at load on the GPU: the
    engine's expert weights are the values the 4-bit codes decode to, in bf16 and fp32 (bf16 holds
    them exactly), and the fp32 engine is token-identical to generate on the same checkpoint,
    whole and with the steps compiled."""
    from benchmarks.gpu_check import CACHE, hf_generate, make  # its module imports this one
    from tests.tiny_models import build_mxfp4_checkpoint

    src = build_tiny_checkpoint("gpt_oss", CACHE / "tiny-gpt_oss")
    d, decoded = build_mxfp4_checkpoint(src, CACHE / "tiny-gpt_oss-mxfp4")
    d, bad = str(d), []
    for dtype in ("bfloat16", "float32"):
        params = dict(make(d, dtype=dtype).runner.model.named_parameters())
        bad += [f"{dtype}/{name}" for name, values in decoded.items()
                if params[name].dtype != getattr(torch, dtype) or not torch.equal(params[name].detach().cpu().float(), values)]
    ref = {f"r{i}": hf_generate(d, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
    for label, kw in [("whole", {}), ("compiled", dict(compile_decode=True, compile_prefill=True))]:
        if run_all(make(d, **kw), PROMPTS) != ref:
            bad.append(label)
    if bad:
        raise AssertionError(f"MXFP4 gpt-oss: expert weights not the decoded values / not token-identical: {bad}")
    return {"expert_weights": len(decoded), "cases": 2}
