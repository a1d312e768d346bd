"""Engine benchmark: pdserve's engine against transformers on the same model, in the same run.

Workloads (fixed output lengths, EOS ignored; token-id prompts, random, seeded):
  decode_b1      batch-1 decode step time (median) vs `generate` with a static cache (median step,
                 timestamped by a no-op logits processor)
  batch32        32 x (128 in, 128 out) throughput vs static-cache `generate` at batch 32
  many           N x (512 in, 128 out) vs transformers' continuous batching `generate_batch`

Prints one JSON line per workload: workload, engine_tok_s, hf_tok_s, ratio (engine / hf), device,
and step times in ms where they apply. On CUDA it also measures the HBM copy bandwidth and the
weights' bytes, i.e. the batch-1 decode floor.

The engine runs each workload twice on the same engine (same prompts, prefix cache emptied
before each run): synchronous scheduling (engine_tok_s, engine_step_ms, ratio) and async
scheduling (async_engine_tok_s, async_engine_step_ms, async_ratio; async_speedup = async / sync),
and async_tokens_match says whether both produced the same tokens. --scheduling sync|async
runs one of them only (the other's fields are then absent).

    .venv/bin/python benchmarks/engine.py --smoke                       # tiny sizes, CPU, < 60 s
    python3 benchmarks/engine.py --device cuda --model llama-1b-shape   # the GPU targets
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.protocol import SamplingParams  # noqa: E402
from benchmarks.model_shapes import checkpoint  # noqa: E402

# --model: 'tiny', a random-weight shape (llama-1b-shape = Llama-3.2-1B) or a checkpoint directory
build_model = checkpoint


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


def run_engine(engine: Engine, batch: list[list[int]], out_len: int, tag: str) -> tuple[float, int, list]:
    """Submit all, step to completion; returns (seconds, output tokens, each request's tokens)."""
    sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    out = {f"{tag}-{i}": [] for i in range(len(batch))}
    t0 = time.perf_counter()
    for i, p in enumerate(batch):
        engine.add_request(f"{tag}-{i}", p, sp)
    n = 0
    while engine.has_work():
        for d in engine.step().deltas:
            out[d.request_id] += d.token_ids
            n += len(d.token_ids)
    return time.perf_counter() - t0, n, list(out.values())


def modes(args) -> list[tuple[str, bool]]:
    """(field prefix, async_scheduling) for each scheduling mode measured."""
    return [("" if m == "sync" else "async_", m == "async") for m in args.scheduling.split(",")]


def each_mode(engine: Engine, args, fn) -> dict:
    """Run fn() -> (row fields, tokens) under each scheduling mode on the same engine, prefix
    cache emptied first (same work in both); fields are prefixed per mode."""
    row, tokens = {}, {}
    for prefix, is_async in modes(args):
        engine.async_scheduling = is_async
        engine.pool.reset_cache()
        fields, tokens[is_async] = fn()
        row.update({prefix + k: v for k, v in fields.items()})
    if len(tokens) == 2:
        row["async_tokens_match"] = tokens[True] == tokens[False]
    engine.async_scheduling = modes(args)[-1][1]
    return row


class StepClock:
    """A logits processor that only timestamps each decoding step of `generate` (after a sync)."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores

    def step_ms(self) -> float:
        return statistics.median(b - a for a, b in zip(self.times, self.times[1:])) * 1e3


def hf_generate(model, batch: list[list[int]], out_len: int, device: str, clock: StepClock | None = None) -> float:
    from transformers import LogitsProcessorList

    ids = torch.tensor(batch, device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len, min_new_tokens=out_len,
                             do_sample=False, cache_implementation="static", eos_token_id=None, pad_token_id=0,
                             logits_processor=LogitsProcessorList([clock] if clock else []))
    sync(device)
    if out.shape[1] != ids.shape[1] + out_len:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} tokens, not {out_len}")
    return time.perf_counter() - t0


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b > 0 else float("nan")


def bench_decode_b1(engine, hf, args, vocab) -> dict:
    p_len, steps = args.b1_prompt, args.b1_steps

    def measure():
        run_engine(engine, prompts(1, p_len, vocab, 1), steps, "warm-b1")
        engine.pool.reset_cache()
        engine.add_request("b1", prompts(1, p_len, vocab, 2)[0],
                           SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True))
        tokens = [t for d in engine.step().deltas for t in d.token_ids]  # prefill (+ 1st token if sync)
        times = []
        while engine.has_work():
            t0 = time.perf_counter()
            for d in engine.step().deltas:
                tokens += d.token_ids
            times.append(time.perf_counter() - t0)
        step_ms = statistics.median(times) * 1e3
        return dict(engine_step_ms=round(step_ms, 3), engine_tok_s=round(1e3 / step_ms, 1)), tokens

    row = each_mode(engine, args, measure)
    batch = prompts(1, p_len, vocab, 3)
    hf_generate(hf, batch, steps + 1, args.device)  # warm-up (and any compilation)
    hf_ms = float("inf")
    for _ in range(args.repeats):  # median step of each run, best run
        clock = StepClock(args.device)
        hf_generate(hf, batch, steps + 1, args.device, clock)
        hf_ms = min(hf_ms, clock.step_ms())
    row = dict(workload="decode_b1", prompt_len=p_len, steps=steps, **row, hf_step_ms=round(hf_ms, 3),
               hf_tok_s=round(1e3 / hf_ms, 1))
    if args.device == "cuda":
        row.update(gpu_floor(engine))
    return row


def gpu_floor(engine) -> dict:
    """Weight bytes / measured copy bandwidth, and the captured batch-1 graph's replay time."""
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        y.copy_(x)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    copy_gbs = 2 * x.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e9  # bytes read + written
    del x, y
    row = dict(weight_bytes=weight_bytes, copy_gbs=round(copy_gbs, 1),
               floor_ms=round(weight_bytes / (copy_gbs * 1e9) * 1e3, 3), card=torch.cuda.get_device_name())
    graphs = engine.runner.graphs
    if graphs is not None and 1 in graphs.graphs:
        graph = graphs.graphs[1][0]
        for _ in range(5):
            graph.replay()
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        row["engine_graph_ms"] = round(start.elapsed_time(end) / 50, 3)
    return row


def bench_batch(engine, hf, args, vocab) -> dict:
    n, p_len, out_len = args.batch, args.batch_prompt, args.batch_out

    def measure():
        run_engine(engine, prompts(n, p_len, vocab, 10), out_len, "warm-batch")
        engine.pool.reset_cache()
        secs, toks, tokens = run_engine(engine, prompts(n, p_len, vocab, 11), out_len, "batch")
        return dict(engine_tok_s=round(toks / secs, 1), engine_s=round(secs, 3)), tokens

    row = each_mode(engine, args, measure)
    batch = prompts(n, p_len, vocab, 12)
    hf_generate(hf, batch, out_len, args.device)
    hf_secs = min(hf_generate(hf, batch, out_len, args.device) for _ in range(args.repeats))
    return dict(workload=f"batch{n}", requests=n, prompt_len=p_len, output_len=out_len, **row,
                hf_tok_s=round(n * out_len / hf_secs, 1), hf_s=round(hf_secs, 3))


def bench_many(engine, hf, args, vocab) -> dict:
    from transformers import GenerationConfig

    n, p_len, out_len = args.num_requests, args.many_prompt, args.many_out

    def measure():
        run_engine(engine, prompts(min(n, 8), p_len, vocab, 20), out_len, "warm-many")
        engine.pool.reset_cache()
        secs, toks, tokens = run_engine(engine, prompts(n, p_len, vocab, 21), out_len, "many")
        return dict(engine_tok_s=round(toks / secs, 1), engine_s=round(secs, 3)), tokens

    row = dict(workload="many", requests=n, prompt_len=p_len, output_len=out_len, **each_mode(engine, args, measure))
    gc = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = {}
    if args.smoke:
        # generate_batch sizes its paged cache and a max_batch_tokens^2 attention mask from free
        # memory when not told (8192 batch tokens: ~20 s of filling static tensors on the CPU, for
        # 4 requests of 40 tokens): the smoke run tells it what the workload needs
        from transformers import ContinuousBatchingConfig

        cb["continuous_batching_config"] = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=256)
    batch = prompts(n, p_len, vocab, 22)
    try:  # not under inference_mode: generate_batch resets its own static tensors in place
        hf.generate_batch(prompts(min(n, 8), p_len, vocab, 23), generation_config=gc, **cb)  # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        out = hf.generate_batch(batch, generation_config=gc, **cb)
        sync(args.device)
        hf_secs = time.perf_counter() - t0
        hf_toks = sum(len(o.generated_tokens) for o in out.values())
        errors = [o.error for o in out.values() if o.error]
        if hf_toks == 0 or errors:
            raise RuntimeError(f"generate_batch produced {hf_toks} tokens; errors: {errors[:1]}")
        row.update(hf_tok_s=round(hf_toks / hf_secs, 1), hf_s=round(hf_secs, 3), hf_tokens=hf_toks)
    except Exception as e:  # report, don't hide: the row says what transformers did
        row.update(hf_tok_s=float("nan"), hf_error=f"{type(e).__name__}: {e}"[:300])
    return row


def add_engine_flags(ap: argparse.ArgumentParser) -> None:
    """The engine settings the GPU benchmarks (this one, profile_decode.py) turn on or off."""
    ap.add_argument("--fuse-projections", action="store_true",
                    help="engine.fuse_projections: true (default: auto, on for CUDA)")
    ap.add_argument("--gemv", action="store_true", help="engine.gemv on (Triton GEMV where it times faster)")
    ap.add_argument("--no-rope-table", action="store_true", help="engine.rope_table off (RoPE computed per forward)")
    ap.add_argument("--tune-batch1", action="store_true", help="engine.tune_batch1 on (batch 1 compiled under "
                    "inductor's coordinate-descent tuning; off by default)")
    ap.add_argument("--fused-decode", type=int, default=None, metavar="MAX_BATCH",
                    help="engine.fused_decode_max_batch (default: the config's, 1)")
    ap.add_argument("--no-fused-decode", action="store_true", help="engine.fused_decode off (default: auto)")


def engine_flag_settings(args) -> dict:
    """EngineConfig fields from add_engine_flags' flags."""
    return dict(fuse_projections=args.fuse_projections or "auto", gemv=args.gemv, rope_table=not args.no_rope_table,
                tune_batch1=args.tune_batch1, fused_decode=False if args.no_fused_decode else "auto",
                **({} if args.fused_decode is None else {"fused_decode_max_batch": args.fused_decode}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="tiny", help="tiny | llama-1b-shape | small-shape | <checkpoint dir>")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--num-requests", type=int, default=None, help="N of the 'many' workload (default 256 cuda, 16 cpu)")
    ap.add_argument("--workloads", default="decode_b1,batch,many")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI): < 60 s")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (both sides)")
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--no-compile", action="store_true", help="CUDA graphs of the eager model (no torch.compile)")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench-models"))
    add_engine_flags(ap)
    ap.add_argument("--hf-eager", action="store_true",
                    help="transformers' static-cache generate without its automatic torch.compile (reduce-overhead: "
                         "inductor's CUDA graph trees in this process beside the engine's graphs)")
    ap.add_argument("--scheduling", default="sync,async", choices=["sync,async", "sync", "async"],
                    help="engine scheduling modes to measure, each on the same engine and prompts")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.model = "cpu", "tiny"
    torch.set_num_threads(args.threads)
    small = args.smoke
    args.b1_prompt, args.b1_steps = (16, 16) if small else (128, 128)
    args.batch, args.batch_prompt, args.batch_out = (4, 16, 8) if small else (32, 128, 128)
    args.many_prompt, args.many_out = (32, 8) if small else (512, 128)
    if args.num_requests is None:
        args.num_requests = 4 if small else (256 if args.device == "cuda" else 16)
    args.repeats = 1 if small else 3
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    from transformers import AutoModelForCausalLM

    model_dir = build_model(args.model, Path(args.cache_dir))
    max_seqs = 4 if small else (256 if args.device == "cuda" else 32)
    max_len = 1024
    bs = 16
    blocks = max_seqs * (-(-(max(args.many_prompt, args.batch_prompt) + args.many_out + 16) // bs)) + 64
    ecfg = EngineConfig(block_size=bs, num_kv_blocks=blocks, blocks_per_segment=max(16, blocks // 8),
                        max_num_batched_tokens=256 if small else (16384 if args.device == "cuda" else 1024),
                        max_num_seqs=max_seqs, max_model_len=max_len, attention_backend=args.attention_backend,
                        compile_decode=not args.no_compile, **engine_flag_settings(args))
    t0 = time.perf_counter()
    engine = Engine(ModelConfig(device=args.device, dtype=dtype), ecfg, model_dir)
    init_s = time.perf_counter() - t0
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(args.device).eval()
    hf.generation_config.disable_compile = args.hf_eager
    vocab = engine.vocab_size
    common = dict(device=args.device, model=args.model, dtype=dtype, threads=args.threads,
                  attention_backend=type(engine.runner.backend).__name__,
                  cuda_graphs=engine.runner.graphs is not None,
                  compile_decode=engine.runner.compile_decode and engine.runner.graphs is not None,
                  fuse_projections=engine.runner.fused_groups > 0,
                  gemv=[f"{r['shape'][0]}x{r['shape'][1]}:{r['kernel']}" for r in engine.runner.gemv_choices],
                  engine_init_s=round(init_s, 2), hf_compiled=not args.hf_eager, rope_tables=engine.runner.rope_tables,
                  # decode batches <= this run engine.fused_decode's kernels (0: none)
                  fused_decode_max_batch=getattr(getattr(engine.runner.graphs, "fused", None), "max_batch", 0))
    if args.device == "cuda":
        common["card"] = torch.cuda.get_device_name()
    benches = {"decode_b1": bench_decode_b1, "batch": bench_batch, "many": bench_many}
    for name in args.workloads.split(","):
        row = benches[name](engine, hf, args, vocab)
        for prefix, _ in modes(args):
            row[prefix + "ratio"] = ratio(row[prefix + "engine_tok_s"], row["hf_tok_s"])
        if "engine_tok_s" in row and "async_engine_tok_s" in row:
            row["async_speedup"] = ratio(row["async_engine_tok_s"], row["engine_tok_s"])
        print(json.dumps({**row, **common}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    raise SystemExit(main())
