"""benchmarks/gpu_check.py's prompt-logprob checks (SamplingParams.prompt_logprobs) on CUDA, with the
fast path on: Triton attention, compiled prefill and decode graphs, async scheduling. CUDA only.

  prompt-logprobs     tiny fp32 llama and mistral, a 70-token prompt in 16-token steps beside plain
                      requests: each prompt token's logprob within 1e-4 of transformers' forward on
                      CUDA and the top-5 ids equal; the plain requests token-identical to generate;
                      nothing compiled after the warm-up; every block back in the pool
  prompt-logprobs-1b  the Llama-3.2-1B shape in bf16 (vocab 128256), a 4000-token prompt in 2048-token
                      steps: the peak memory above a plain prefill of the same prompt (a [prompt,
                      vocab] fp32 logits tensor would be 1.9 GiB), the requests' times (plain, top 5,
                      top 1), and the logprobs against transformers' bf16 forward (mean |diff|,
                      top-1 agreement)
"""

from __future__ import annotations

import dataclasses
import time

import torch

from tests.tiny_models import build_tiny_checkpoint
from tests.workers.engine.helpers import GREEDY, PROMPTS
from workers.protocol import SamplingParams

LONG = [(i * 7) % 300 + 3 for i in range(70)]
ECHO = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=5)


def _run(engine, requests: dict) -> dict:
    """Per id: (tokens, first delta)."""
    out = {rid: ([], None) for rid in requests}
    for rid, (prompt, sp) in requests.items():
        engine.add_request(rid, prompt, sp)
    while engine.has_work():
        for d in engine.step().deltas:
            if d.error:
                raise AssertionError(f"{d.request_id}: {d.error}")
            tokens, first = out[d.request_id]
            tokens += d.token_ids
            out[d.request_id] = (tokens, first or d)
    return out


def _reference(model, prompt: list[int]):
    with torch.inference_mode():
        lp = model(torch.tensor([prompt], device="cuda")).logits[0].float().log_softmax(-1)[:-1]
    return lp.gather(1, torch.tensor(prompt[1:], device="cuda")[:, None])[:, 0].cpu(), lp.topk(5, dim=-1)


def check_prompt_logprobs() -> dict:
    from torch._dynamo.utils import counters

    from benchmarks.gpu_check import CACHE, _HF, hf_generate, make

    worst, bad = 0.0, []
    for family in ("llama", "mistral"):
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        e = make(d, compile_prefill=True, compile_decode=True, max_num_batched_tokens=16)
        if not e.async_scheduling or e.runner.graphs is None or not e.runner.compiled_general:
            raise AssertionError("the fast path is not on")
        graphs = counters["stats"]["unique_graphs"]
        requests = {"echo": (LONG, ECHO), "gen": (PROMPTS[2], dataclasses.replace(GREEDY, prompt_logprobs=2))}
        requests |= {f"plain{i}": (p, GREEDY) for i, p in enumerate(PROMPTS[:4])}
        got = _run(e, requests)
        if counters["stats"]["unique_graphs"] != graphs:
            bad.append(f"{family}: compiled after the warm-up")
        if e.stats().num_used_blocks or e.requests:
            bad.append(f"{family}: blocks or requests left")
        for i, p in enumerate(PROMPTS[:4]):
            if got[f"plain{i}"][0] != hf_generate(d, p, GREEDY.max_tokens):
                bad.append(f"{family}/plain{i}")
        if got["gen"][0] != hf_generate(d, PROMPTS[2], GREEDY.max_tokens):
            bad.append(f"{family}/gen tokens")
        for rid, prompt, k in (("echo", LONG, 5), ("gen", PROMPTS[2], 2)):
            want, top = _reference(_HF[(d, "float32")], prompt)
            delta = got[rid][1]
            diff = (torch.tensor(delta.prompt_logprobs[1:]) - want).abs().max().item()
            worst = max(worst, diff)
            ids = [[i for i, _ in t] for t in delta.prompt_top_logprobs[1:]]
            if diff > 1e-4 or ids != top.indices[:, :k].tolist() or delta.prompt_logprobs[0] is not None:
                bad.append(f"{family}/{rid}: max |diff| {diff:.2e}")
        del e
    if bad:
        raise AssertionError(f"prompt logprobs on CUDA: {bad}")
    return {"families": ["llama", "mistral"], "max_abs_diff": worst}


def check_prompt_logprobs_1b(num_tokens: int = 4000) -> dict:
    from benchmarks.engine import build_model
    from benchmarks.gpu_check import CACHE
    from workers.engine.config import EngineConfig, ModelConfig
    from workers.engine.engine import Engine

    d = build_model("llama-1b-shape", CACHE)
    e = Engine(ModelConfig(device="cuda", dtype="bfloat16"),
               EngineConfig(block_size=16, num_kv_blocks=1024, blocks_per_segment=64, max_num_batched_tokens=2048,
                            max_num_seqs=8, max_model_len=8192), d)
    prompt = torch.randint(10, 128000, (num_tokens,), generator=torch.Generator().manual_seed(3)).tolist()
    plain = SamplingParams(max_tokens=1, temperature=0)
    out = {}
    echo1 = dataclasses.replace(ECHO, prompt_logprobs=1)  # lm-eval's logprobs=1
    for i, (rid, sp) in enumerate([("warm", ECHO), ("plain", plain), ("echo", ECHO), ("echo1", echo1)]):
        e.pool.reset_cache()  # every run computes the whole prompt
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        got = _run(e, {rid: (prompt[i:] + prompt[:i], sp)})[rid][1]
        torch.cuda.synchronize()
        out[rid] = (got, time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base)
    echo, _, _ = out["echo"]
    del e
    torch.cuda.empty_cache()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    want, top = _reference(model, prompt[2:] + prompt[:2])
    diff = (torch.tensor(echo.prompt_logprobs[1:]) - want).abs()
    top1 = sum(t[0][0] == i for t, i in zip(echo.prompt_top_logprobs[1:], top.indices[:, 0].tolist())) / len(want)
    res = {"prompt_tokens": num_tokens, "plain_s": round(out["plain"][1], 4), "echo_s": round(out["echo"][1], 4),
           "echo_k1_s": round(out["echo1"][1], 4),
           "plain_peak_mib": round(out["plain"][2] / 2**20), "echo_peak_mib": round(out["echo"][2] / 2**20),
           "mean_abs_diff": round(diff.mean().item(), 4), "max_abs_diff": round(diff.max().item(), 4),
           "top1_agreement": round(top1, 4)}
    if res["echo_peak_mib"] - res["plain_peak_mib"] > 1024 or res["mean_abs_diff"] > 0.05 or top1 < 0.9:
        raise AssertionError(f"prompt logprobs (1B, bf16): {res}")
    return res
