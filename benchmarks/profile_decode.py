"""Where a decode step's GPU time goes: replays the engine's captured decode graph for a few batch
sizes under torch.profiler and prints the kernels by total time, plus the engine's wall-clock step
next to the bare graph replay (the difference is host work not hidden behind the GPU), with
synchronous scheduling (engine_step_ms) and with async scheduling (async_engine_step_ms, the
host work of step n+1 overlapping the GPU's step n). CUDA only.

    python3 benchmarks/profile_decode.py --model llama-1b-shape --batch-sizes 1,32
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


def kernel_table(graph, replays: int = 20, top: int = 12) -> list[tuple[str, float]]:
    return kernel_times(graph.replay, replays, top)[1]


class _Eager:
    def __init__(self, fn):
        self.replay = fn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b-shape")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench-models"))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--fuse-projections", action="store_true", help="engine.fuse_projections: true (default: auto, on for CUDA)")
    ap.add_argument("--gemv", action="store_true", help="engine.gemv on (Triton GEMV where it times faster)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    model_dir = build_model(args.model, Path(args.cache_dir))
    engine = Engine(ModelConfig(device="cuda", dtype="bfloat16"),
                    EngineConfig(block_size=16, num_kv_blocks=max(sizes) * 24 + 64, blocks_per_segment=256,
                                 max_num_batched_tokens=4096, max_num_seqs=max(sizes), max_model_len=1024,
                                 compile_decode=not args.no_compile, fuse_projections=args.fuse_projections or "auto",
                                 gemv=args.gemv),
                    model_dir)
    graphs = engine.runner.graphs
    for n in sizes:
        sp = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        for i, p in enumerate(prompts(n, 128, engine.vocab_size, n)):
            engine.add_request(f"p{n}-{i}", p, sp)
        engine.step()  # prefill
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
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        table = kernel_table(graph)
        if len(table) < 3:  # the profiler did not see inside the graph: profile the same code eagerly
            ids, pos, _ = engine.runner.backend.prepare([], [], [], None, pad_to=size)
            table = kernel_table(_Eager(lambda: graphs.forward(ids, pos)))
        print(json.dumps({"batch": n, "graph_size": size, "engine_step_ms": step_ms[False],
                          "async_engine_step_ms": step_ms[True], "graph_replay_ms": round(start.elapsed_time(end) / 50, 3),
                          "kernels_us": [(name, round(us, 1)) for name, us in table]}))
        while engine.has_work():
            engine.step()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
