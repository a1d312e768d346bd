"""Where a decode step's GPU time goes: replays the engine's captured decode graph for a few batch
sizes under torch.profiler and prints the kernels by total time, plus the engine's wall-clock step
next to the bare graph replay (the difference is host work not hidden behind the GPU), with
synchronous scheduling (engine_step_ms) and with async scheduling (async_engine_step_ms, the
host work of step n+1 overlapping the GPU's step n). CUDA only.

--decode-variants: then, per batch size, one JSON line per setting of the decode attention
(TritonPagedAttention's decode_* knobs; the graphs are recaptured for each) with the bare graph
replay and the attention kernels' time; "default" sweeps DEFAULT_VARIANTS, today's path first.

    python3 benchmarks/profile_decode.py --model llama-1b-shape --batch-sizes 1,32
    python3 benchmarks/profile_decode.py --batch-sizes 1,8,32 --decode-variants default
    python3 benchmarks/profile_decode.py --batch-sizes 1 --decode-variants "kernel=general;kernel=split,splits=8"
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

from benchmarks.cuda_kernels import kernel_times, step_timeline  # noqa: E402
from benchmarks.engine import add_engine_flags, build_model, engine_flag_settings, prompts  # noqa: E402
from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.protocol import SamplingParams  # noqa: E402


# short name -> TritonPagedAttention attribute
KNOBS = {"kernel": "decode_kernel", "splits": "decode_splits", "chunk_keys": "decode_chunk_keys",
         "block_n": "decode_split_block_n", "programs": "decode_programs", "warps": "decode_warps",
         "stages": "decode_stages", "combine": "decode_combine", "fuse_write": "decode_fuse_write",
         "prefetch": "decode_prefetch", "preload": "decode_preload"}
# split: 256-key chunks of 64-key tiles, auto split count (~one program per SM, at most one per
# chunk a row can have), 4 warps, merged by the last program, K/V written in the same launch; each
# line changes one knob (or two: chunk_keys=32 needs 32- or 16-key tiles)
DEFAULT_VARIANTS = ("kernel=general;kernel=split;kernel=split,chunk_keys=64;kernel=split,chunk_keys=128;"
                    "kernel=split,chunk_keys=512;kernel=split,chunk_keys=32,block_n=32;"
                    "kernel=split,chunk_keys=128,block_n=128;kernel=split,chunk_keys=256,block_n=128;"
                    "kernel=split,block_n=32;kernel=split,combine=kernel;kernel=split,fuse_write=0;"
                    "kernel=split,splits=1;kernel=split,programs=264;kernel=split,warps=2;kernel=split,warps=8;"
                    "kernel=split,stages=2")
ATTENTION_KERNELS = ("paged_attention_kernel", "paged_decode_kernel", "decode_combine_kernel", "write_kv_kernel")


def parse_variant(spec: str) -> dict[str, object]:
    """'kernel=split,splits=8' -> {'decode_kernel': 'split', 'decode_splits': 8}."""
    out: dict[str, object] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in KNOBS or not value:
            raise SystemExit(f"decode variant {spec!r}: want key=value with key in {sorted(KNOBS)}")
        if key in ("fuse_write", "prefetch", "preload"):
            out[KNOBS[key]] = value not in ("0", "false", "False")
        else:
            out[KNOBS[key]] = int(value) if value.isdigit() else value
    return out


def kernel_table(graph, replays: int = 20, top: int = 12) -> list[tuple[str, float]]:
    return kernel_times(graph.replay, replays, top)[1]


def replay_ms(graph, n: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / n, 4)


def sweep_variants(engine: Engine, batch: int, size: int, specs: list[str]) -> None:
    """Per spec: set the knobs, recapture the decode graph of ``size`` (only that one: fewer
    kernel compiles), run real decode steps (the graph's metadata is then a real step's), time the
    bare replay and profile the attention kernels. Then every graph is recaptured as it was."""
    backend, graphs = engine.runner.backend, engine.runner.graphs
    defaults = {attr: getattr(backend, attr) for attr in KNOBS.values()}
    engine.async_scheduling = False
    all_sizes, graphs.sizes = graphs.sizes, [size]
    for spec in specs:
        for attr, value in {**defaults, **parse_variant(spec)}.items():
            setattr(backend, attr, value)
        engine.step()  # the in-flight work settles before the graphs are replaced
        graphs.capture()
        for _ in range(3):
            engine.step()
        graph = graphs.graphs[size][0]
        replay_ms(graph, 10)
        ms = replay_ms(graph)
        table = kernel_times(graph.replay, 20, 200)[1]
        attention = {name: round(us, 1) for name, us in table if name.startswith(ATTENTION_KERNELS)}
        context = int(backend.meta.host_view("ctx")[0])
        splits = backend.step_decode.splits if backend.step_decode is not None else None
        print(json.dumps({"batch": batch, "graph_size": size, "variant": spec, "splits": splits,
                          "context": context, "graph_replay_ms": ms,
                          "attention_us": round(sum(attention.values()), 1), "attention_kernels_us": attention}),
              flush=True)
    for attr, value in defaults.items():
        setattr(backend, attr, value)
    engine.step()
    graphs.sizes = all_sizes
    graphs.capture()


def sweep_fused_tiles(engine: Engine, batch: int, size: int, specs: list[str]) -> None:
    """engine.fused_decode's GEMV tiles: per spec ('small_k=2x4,large_k=1x8,lm_head=4x4'; kinds not
    named keep the default), recapture the graph of ``size``, run real steps, time the replay."""
    graphs = engine.runner.graphs
    fused = graphs.fused
    defaults = dict(fused.tiles)
    engine.async_scheduling = False
    all_sizes, graphs.sizes = graphs.sizes, [size]
    for spec in specs:
        fused.tiles = dict(defaults)
        for item in filter(None, spec.split(",")):
            kind, _, tile = item.partition("=")
            if kind not in defaults:
                raise SystemExit(f"--fused-tiles {spec!r}: kinds are {sorted(defaults)}")
            fused.tiles[kind] = tuple(int(v) for v in tile.split("x"))
        engine.step()
        graphs.capture()
        for _ in range(3):
            engine.step()
        graph = graphs.graphs[size][0]
        replay_ms(graph, 10)
        print(json.dumps({"batch": batch, "graph_size": size, "fused_tiles": spec or "default",
                          "graph_replay_ms": replay_ms(graph)}), flush=True)
    fused.tiles = defaults
    engine.step()
    graphs.sizes = all_sizes
    graphs.capture()


def set_inductor(spec: str) -> dict[str, object]:
    """'max_autotune_gemm=1,max_autotune_gemm_backends=TRITON' -> those torch._inductor.config
    attributes set (an unknown key fails before anything is built)."""
    import torch._inductor.config as inductor_config
    done = {}
    for item in filter(None, spec.split(",")):
        key, _, raw = item.partition("=")
        if not hasattr(inductor_config, key):
            raise SystemExit(f"--inductor: torch._inductor.config has no {key!r}")
        value: object = int(raw) if raw.lstrip("-").isdigit() else raw
        setattr(inductor_config, key, value)
        done[key] = value
    return done


class _Eager:
    def __init__(self, fn):
        self.replay = fn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b-shape")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench-models"))
    ap.add_argument("--no-compile", action="store_true")
    add_engine_flags(ap)
    ap.add_argument("--inductor", default="",
                    help="torch._inductor.config settings for the decode graph's compile, 'key=value,...' "
                         "(e.g. max_autotune_gemm=1): values parsed as int, else kept as strings")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (the decode context grows from here)")
    ap.add_argument("--decode-variants", default="",
                    help="';'-separated decode attention settings, each 'key=value,...' with keys "
                         f"{sorted(KNOBS)}; or 'default' (DEFAULT_VARIANTS)")
    ap.add_argument("--timeline", action="store_true",
                    help="per batch size, the async engine step's device timeline: busy, span and idle time a "
                         "step and the device ops by time (graph and the work around it)")
    ap.add_argument("--fused-tiles", default="",
                    help="';'-separated engine.fused_decode tile sets swept at batch sizes it runs, e.g. "
                         "';small_k=4x8;lm_head=8x8' (an empty item: the defaults)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    spec = DEFAULT_VARIANTS if args.decode_variants == "default" else args.decode_variants
    variants = [v for v in spec.split(";") if v]
    for v in variants:
        parse_variant(v)  # fail before building anything
    for key, value in set_inductor(args.inductor).items():
        print(json.dumps({"inductor": key, "value": value}), flush=True)
    model_dir = build_model(args.model, Path(args.cache_dir))
    t_build = time.perf_counter()
    extra = 5 * len(variants) + (25 if args.timeline else 0)  # decode steps past the first 200
    blocks_per_seq = max(24, -(-(args.prompt_len + 210 + extra) // 16))
    engine = Engine(ModelConfig(device="cuda", dtype="bfloat16"),
                    EngineConfig(block_size=16, num_kv_blocks=max(sizes) * blocks_per_seq + 64,
                                 blocks_per_segment=256, max_num_batched_tokens=4096, max_num_seqs=max(sizes),
                                 max_model_len=max(1024, 16 * blocks_per_seq),
                                 compile_decode=not args.no_compile, **engine_flag_settings(args)),
                    model_dir)
    print(json.dumps({"engine_start_s": round(time.perf_counter() - t_build, 1)}), flush=True)
    graphs = engine.runner.graphs
    for n in sizes:
        sp = SamplingParams(max_tokens=200 + extra, temperature=0, ignore_eos=True)
        for i, p in enumerate(prompts(n, args.prompt_len, engine.vocab_size, n)):
            engine.add_request(f"p{n}-{i}", p, sp)
        for _ in range(-(-n * args.prompt_len // 4096)):  # prefill (chunks of max_num_batched_tokens)
            engine.step()
        step_ms = {}
        for mode in (False, True):
            engine.async_scheduling = mode
            for _ in range(3):  # settle into the mode (async: the pipeline fills)
                engine.step()
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            step_ms[mode] = round(statistics.median(times) * 1e3, 3)
        size = next(s for s in graphs.sizes if s >= n)
        graph = graphs.graphs[size][0]
        graph_ms = replay_ms(graph)
        table = kernel_table(graph)
        if len(table) < 3:  # the profiler did not see inside the graph: profile the same code eagerly
            ids, pos, _ = engine.runner.backend.prepare([], [], [], None, pad_to=size)
            table = kernel_table(_Eager(lambda: graphs.forward(ids, pos)))
        print(json.dumps({"batch": n, "graph_size": size, "engine_step_ms": step_ms[False],
                          "async_engine_step_ms": step_ms[True], "graph_replay_ms": round(graph_ms, 3),
                          "kernels_us": [(name, round(us, 1)) for name, us in table]}), flush=True)
        if args.timeline:  # the async step's device time: the graph and what runs around it
            engine.async_scheduling = True
            engine.step()
            try:
                timeline = step_timeline(engine.step)
            except Exception as e:  # a profiler quirk must not cost the rest of the call
                timeline = {"error": f"{type(e).__name__}: {e}"}
            print(json.dumps({"batch": n, "graph_size": size, "async_step_timeline": timeline}), flush=True)
        if variants:
            sweep_variants(engine, n, size, variants)
        if args.fused_tiles and graphs.fused is not None and size <= graphs.fused.max_batch:
            sweep_fused_tiles(engine, n, size, args.fused_tiles.split(";"))
        while engine.has_work():
            engine.step()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
