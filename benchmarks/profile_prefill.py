"""Where a prefill's time goes: the engine's prefill of long prompts (eager, and with
``engine.compile_prefill``) next to transformers' own forward (sdpa, no cache) of the same tokens
on the same weights, plus the prefill step's kernels by time. CUDA only; one JSON line per case.

    python3 benchmarks/profile_prefill.py --model llama-1b-shape --prompt-len 2048

Fields: ``step_ms`` (median wall time of one engine step that prefills one prompt, sampling
included), ``gpu_ms`` (the same step's kernel time under the profiler), ``hf_forward_ms``
(transformers' forward, last-token logits only), ``ratio`` = hf_forward_ms / step_ms, and
``flops_ms`` (the linear layers' FLOPs at the measured bf16 GEMM rate).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.cuda_kernels import kernel_times  # noqa: E402
from benchmarks.engine import build_model, prompts  # noqa: E402
from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.protocol import SamplingParams  # noqa: E402


def cuda_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def kernels(fn, top: int) -> tuple[float, list]:
    """(ms of kernels in one call of fn, the top kernels [(name, us)])."""
    total_us, table = kernel_times(fn, 1, top, 60)
    return total_us / 1e3, [(k, round(v, 1)) for k, v in table]


def prefill_engine(model_dir, L: int, num_prompts: int, **config) -> Engine:
    """A bf16 CUDA engine that prefills an L-token prompt in one step, with KV for num_prompts of them."""
    return Engine(ModelConfig(device="cuda", dtype="bfloat16"),
                  EngineConfig(block_size=16, num_kv_blocks=num_prompts * (L // 16 + 2), blocks_per_segment=256,
                               max_num_batched_tokens=L, max_num_seqs=64, max_model_len=L + 64, **config), model_dir)


def gemm_tflops() -> float:
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ a, 20)
    return 2 * 4096 ** 3 / (ms / 1e3) / 1e12


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b-shape")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--cases", default="eager,compiled", help="eager | compiled | loop (eager, driven as a worker "
                    "drives it: EngineLoop thread, asyncio on the main thread, the workers' GIL switch interval)")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench-models"))
    ap.add_argument("--tiles", default="", help="eager case only: comma list of prefill attention tiles "
                    "ROWSxBLOCK_NxWARPS[xSTAGES][s] to time after it (one JSON line each; a trailing s: split_diagonal on), "
                    "e.g. 64x64x4,64x64x4s,128x64x8x3")
    ap.add_argument("--no-rope-table", action="store_true", help="engine.rope_table off (RoPE computed per forward)")
    args = ap.parse_args()
    model_dir = build_model(args.model, Path(args.cache_dir))
    n, L = args.num_prompts, args.prompt_len
    tflops = gemm_tflops()
    hf_ms = None
    for case in args.cases.split(","):
        if case == "loop":
            print(json.dumps(in_worker_loop(model_dir, n, L)), flush=True)
            continue
        t0 = time.perf_counter()
        engine = prefill_engine(model_dir, L, n + 2, compile_prefill=case == "compiled",
                                rope_table=not args.no_rope_table)
        init_s = time.perf_counter() - t0
        sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        batch = prompts(n + 3, L, engine.vocab_size, 7)

        def one(i: int, e=engine) -> None:  # the case's engine (the loop deletes its name after)
            e.add_request(f"{case}-{i}", batch[i], sp)
            while e.has_work():
                e.step()
            torch.cuda.synchronize()

        t1 = time.perf_counter()
        one(n)  # first use: Triton / torch.compile
        first_s = time.perf_counter() - t1
        times = []
        for i in range(n):
            t1 = time.perf_counter()
            one(i)
            times.append(time.perf_counter() - t1)
        step_ms = statistics.median(times) * 1e3
        gpu_ms, table = kernels(lambda: one(n + 1), 14)
        if hf_ms is None:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                      attn_implementation="sdpa").cuda().eval()
            ids = torch.tensor([batch[0]], device="cuda")
            with torch.inference_mode():
                hf(input_ids=ids, use_cache=False, logits_to_keep=1)
                hf_ms = cuda_ms(lambda: hf(input_ids=ids, use_cache=False, logits_to_keep=1), 10)
            cfg = hf.config
            inter, hdim = cfg.intermediate_size, cfg.hidden_size
            kvd = cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or hdim // cfg.num_attention_heads)
            per_layer = hdim * (2 * hdim + 2 * kvd) + 3 * hdim * inter
            flops = 2 * L * per_layer * cfg.num_hidden_layers
            del hf
            torch.cuda.empty_cache()
        print(json.dumps({"case": case, "prompt_len": L, "init_s": round(init_s, 1), "first_prefill_s": round(first_s, 2),
                          "step_ms": round(step_ms, 2), "gpu_ms": round(gpu_ms, 2), "hf_forward_ms": round(hf_ms, 2),
                          "ratio": round(hf_ms / step_ms, 3), "gemm_tflops": round(tflops, 1),
                          "flops_ms": round(flops / (tflops * 1e12) * 1e3, 2), "kernels_us": table}), flush=True)
        del engine
        torch.cuda.empty_cache()
    if args.tiles:
        sweep_tiles(model_dir, L, args.tiles.split(","))
    return 0


def in_worker_loop(model_dir, n: int, L: int) -> dict:
    """Prefill-only requests through EngineLoop as a prefill worker runs them (the engine on its
    thread, asyncio on this one, sys.setswitchinterval as in the workers), one at a time: the
    prefill hop (add_request -> handle) next to the step that made the handle."""
    import asyncio

    from workers.engine_loop import EngineLoop
    from workers.worker_base import GIL_SWITCH_INTERVAL_S, HopTimer

    engine = prefill_engine(model_dir, L, n + 2)
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    batch = prompts(n + 2, L, engine.vocab_size, 13)
    before = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    hops = HopTimer()

    async def run() -> list[float]:
        loop = EngineLoop(engine, hops=hops)
        loop.start()
        times = []
        try:
            for i, prompt in enumerate(batch):
                rid = f"loop-{i}"
                fut = loop.expect_handle(rid)
                t0 = time.perf_counter()
                await loop.call(lambda e, rid=rid, prompt=prompt: e.add_request(rid, prompt, sp, prefill_only=True))
                await fut
                times.append(time.perf_counter() - t0)
                await loop.call(lambda e, rid=rid: e.release_handle(rid))
        finally:
            loop.stop()
        return times[2:]  # the first two: warm-up

    try:
        times = asyncio.run(run())
    finally:
        sys.setswitchinterval(before)
    snap = hops.snapshot()
    med = {k: round(statistics.median(v[2:] or v) * 1e3, 2) for k, v in snap.items()}
    return {"case": "loop", "prompt_len": L, "prefill_hop_ms": round(statistics.median(times) * 1e3, 2), "hops_ms": med}


def sweep_tiles(model_dir, L: int, specs: list[str]) -> None:
    """Time the eager prefill step and its attention kernel under each tile, on one prompt
    prefilled again and again (prefix caching off); layer 0's attention output is compared with
    the first spec's (the same math in another order: bf16 rounding apart)."""
    engine = prefill_engine(model_dir, L, 2, enable_prefix_caching=False)
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompt = prompts(1, L, engine.vocab_size, 11)[0]
    be = engine.runner.backend
    orig, seen = be._forward, {}

    def record(layer, q, k, v, scaling, window):
        out = orig(layer, q, k, v, scaling, window)
        if layer == 0:
            seen["out"] = out.float().clone()
        return out

    def one() -> None:
        engine.add_request(f"tile-{time.perf_counter_ns()}", prompt, sp)
        while engine.has_work():
            engine.step()
        torch.cuda.synchronize()

    be._forward = record
    ref = None
    for spec in specs:
        be.split_diagonal = spec.endswith("s")
        parts = [int(x) for x in spec.removesuffix("s").split("x")]
        be.prefill_rows, be.prefill_block_n, be.prefill_warps = parts[:3]
        be.prefill_stages = parts[3] if len(parts) > 3 else None
        try:
            one()  # compiles this variant
            step_ms = cuda_ms(one, 6)
            _, table = kernels(one, 40)
        except Exception as e:  # a tile the kernel cannot take (shared memory): say so, go on
            print(json.dumps({"tile": spec, "error": f"{type(e).__name__}: {str(e)[:200]}"}), flush=True)
            continue
        attn_us = sum(us for name, us in table if "paged_attention" in name)
        ref = seen["out"] if ref is None else ref
        err = float((seen["out"] - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
        print(json.dumps({"tile": spec, "step_ms": round(step_ms, 2), "attention_us": round(attn_us, 1),
                          "max_rel_diff_vs_first": round(err, 5)}), flush=True)
    be._forward = orig


if __name__ == "__main__":
    raise SystemExit(main())
