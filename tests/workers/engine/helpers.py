"""Shared pieces of the engine tests: building engines, running requests to completion, and
transformers' own greedy generate as the reference."""

from __future__ import annotations

import functools

import torch

from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.engine import Engine
from workers.protocol import SamplingParams

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [20, 21, 22],
    list(range(30, 60)),
    [100, 101, 102, 103, 104, 105, 106, 107],
    [7] * 13,
]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
ASYNC_SCHEDULING = False  # the mode make_engine() uses by default (set per test session mode by conftest.py)


def make_engine(model_dir: str, dtype: str = "float32", worker_id: str = "engine", **engine_kwargs) -> Engine:
    cfg = dict(block_size=4, num_kv_blocks=128, blocks_per_segment=16, max_num_batched_tokens=64, max_num_seqs=8,
               async_scheduling=ASYNC_SCHEDULING)
    cfg.update(engine_kwargs)
    return Engine(ModelConfig(device="cpu", dtype=dtype), EngineConfig(**cfg), model_dir, worker_id=worker_id)


def run_all(engine: Engine, prompts, sampling=GREEDY, prefix="r", **add_kwargs) -> dict[str, list[int]]:
    """Submit every prompt, step until done; returns request id -> output token ids."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", p, sampling, **add_kwargs)
        out[f"{prefix}{i}"] = []
    overlapped = engine.num_overlapped_steps
    drain(engine, out)
    if engine.async_scheduling and not add_kwargs.get("prefill_only"):
        assert engine.num_overlapped_steps > overlapped, "async scheduling on, but no step was left in flight"
    return out


def drain(engine: Engine, out: dict[str, list[int]], max_steps: int = 10_000) -> list:
    finished = []
    for _ in range(max_steps):
        if not engine.has_work():
            return finished
        for d in engine.step().deltas:
            out.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finished:
                finished.append(d)
    raise AssertionError("engine did not finish")


def collect(engine, requests: dict[str, tuple[list[int], SamplingParams]], with_logprobs: bool = False):
    """Submit all, step to the end; per request: (tokens, finish reason, error[, logprobs, top logprobs]).
    Fails if a request gets a delta after its final one."""
    got = {rid: [[], None, None, 0, [], []] for rid in requests}
    for rid, (prompt, sp) in requests.items():
        engine.add_request(rid, prompt, sp)
    steps = 0
    while engine.has_work():
        steps += 1
        assert steps < 1000
        for d in engine.step().deltas:
            entry = got[d.request_id]
            assert entry[1] is None, f"delta for {d.request_id} after it finished"
            entry[0] += d.token_ids
            entry[3] += 1
            entry[4] += d.logprobs or []
            entry[5] += d.top_logprobs or []
            if d.finished:
                entry[1], entry[2] = d.finish_reason, d.error
    if with_logprobs:
        return {rid: (*v[:3], v[4], v[5]) for rid, v in got.items()}
    return {rid: tuple(v[:3]) for rid, v in got.items()}


@functools.lru_cache(maxsize=None)
def hf_model(model_dir: str, dtype: str = "float32"):
    """transformers' model as the reference; a model that caps its attention logits (Gemma 2) with
    eager attention, the exact one: transformers 5.17 picks SDPA for Gemma 2, which drops the cap.
    MXFP4 experts dequantized to ``dtype`` as the engine loads them (transformers 5.17 dequantizes
    them to bf16 whatever the dtype)."""
    from workers.engine.model_runner import attention_logit_cap, load_causal_lm, load_hf_config

    config = load_hf_config(model_dir)
    kw = {"attn_implementation": "eager"} if attention_logit_cap(config) else {}
    return load_causal_lm(model_dir, config, getattr(torch, dtype), **kw).eval()


def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int, dtype: str = "float32") -> list[int]:
    model = hf_model(model_dir, dtype)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def assert_all_blocks_free(engine: Engine) -> None:
    s = engine.stats()
    assert s.num_used_blocks == 0, f"{s.num_used_blocks} blocks still in use"
    assert s.num_free_blocks == s.num_target_blocks, s  # every usable block is back in the pool
    assert not engine.requests, f"requests left: {list(engine.requests)}"
