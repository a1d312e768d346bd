"""The engine's HOST work of one decode step, with the device's work replaced by nothing (issue 8:
batch-32 decode is host-bound on an H200). Runs in seconds on a CPU.

    .venv/bin/python benchmarks/step_host_cost.py                       # batch 1,32,128,256
    .venv/bin/python benchmarks/step_host_cost.py --profile             # + cProfile top list
    git worktree add --detach /tmp/shc-old <commit>                     # the code to compare against
    .venv/bin/python benchmarks/step_host_cost.py --before /tmp/shc-old
    git worktree remove /tmp/shc-old

A real Engine (the tests' tiny llama and its tokenizer, on the CPU) runs the GPU's decode path:
the Triton backend's host side (prepare: metadata staged for one upload) and the decode-graph
path (DecodeGraphs.run, padded to the capture size), but the graph "replay" does nothing and
returns precomputed logits, and the general (prefill) forward returns them too. What remains
is schedule, pack, prepare, the token fill, the sampler's host side (a greedy argmax of a
384-token vocabulary), resolve (append_token, detokenize, stop checks), block publishing and
retirement: the host's step. Async scheduling, greedy, ignore_eos, as benchmarks/host_profile.py.

One JSON line per batch size and tree: us_per_step (median of the timed steps), mean, and with
--profile the top functions by own time (us per step, profiler-inflated). --before DIR runs the
same measurement in another checkout (its own process; each tree imports ``workers``), then one
line comparing the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from profile_top import run_profiled, top_own_us  # this script's folder (--before: before any other tree's path)

os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend on CPU tensors; its kernels are never launched
REPO = Path(__file__).resolve().parents[1]
TEXT = ("Disaggregated serving splits prefill and decode into separate worker pools. The capital of France "
        "is Paris. A quick brown fox jumps over the lazy dog while the router picks a worker. ") * 4


class _NoGraph:
    """A captured graph whose replay does nothing: its static logits stay as prefilled."""

    def replay(self) -> None:
        pass


def build_engine(tree: Path, max_batch: int):
    sys.path.insert(0, str(tree))
    import torch

    torch.set_num_threads(1)  # the device's stand-ins (argmax, index copies) on one thread: less noise
    from benchmarks.model_shapes import checkpoint
    from workers.engine.config import EngineConfig, ModelConfig
    from workers.engine.cuda_graphs import DecodeGraphs, capture_sizes
    from workers.engine.engine import Engine

    model = checkpoint("tiny", REPO / ".cache" / "bench-models")
    cfg = EngineConfig(block_size=16, num_kv_blocks=max_batch * 34 + 64, blocks_per_segment=256,
                       max_num_batched_tokens=max(4096, max_batch), max_num_seqs=max_batch, max_model_len=512,
                       attention_backend="triton", async_scheduling=True)
    engine = Engine(ModelConfig(device="cpu", dtype="float32"), cfg, model)
    runner = engine.runner
    # precomputed logits: row r's argmax is token r of an English text, so requests decode different
    # tokens, each a whole character (the Detokenizer's one-step path, as with a real model's text)
    text = engine.tokenizer.encode(TEXT, add_special_tokens=False)
    logits = torch.zeros(max(cfg.max_num_batched_tokens, max_batch), engine.vocab_size)
    logits[torch.arange(logits.shape[0]), torch.tensor([text[r % len(text)] for r in range(logits.shape[0])])] = 1.0
    sizes = capture_sizes(max_batch)
    graphs = DecodeGraphs(runner.model, runner.backend, sizes)
    # (graph, logits[, their argmax]): trees from before the graphs' in-graph argmax keep two
    with_argmax = hasattr(DecodeGraphs, "greedy_ids")
    graphs.graphs = {s: (_NoGraph(), logits[:s], *((logits[:s].argmax(-1),) if with_argmax else ())) for s in sizes}
    runner.graphs = graphs
    runner._general = lambda ids, pos, keep: logits[: keep.shape[0]]
    return engine, text


def measure(tree: Path, sizes: list[int], steps: int, prompt_len: int, profile: bool) -> list[dict]:
    engine, text = build_engine(tree, max(sizes))
    from workers.protocol import SamplingParams

    rows = []
    for n in sizes:
        # enough tokens that no request finishes while measured (2 warm-up rounds + the timed steps)
        sp = SamplingParams(max_tokens=min(3 * steps + 8, 511 - prompt_len), temperature=0, ignore_eos=True)
        for i in range(n):
            engine.add_request(f"b{n}-{i}", [text[(i + j) % len(text)] for j in range(prompt_len)], sp)
        for _ in range(-(-n * prompt_len // engine.config.max_num_batched_tokens) + 3):
            engine.step()  # prefill, then into steady decode
        replays = engine.runner.graphs.num_replays
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        row = {"tree": str(tree), "batch": n, "steps": steps, "us_per_step": round(statistics.median(times) * 1e6, 1),
               "mean_us": round(statistics.fmean(times) * 1e6, 1),
               "graph_steps": engine.runner.graphs.num_replays - replays}  # decode steps on the graph path
        if profile:
            stats = run_profiled(engine.step, steps)
            row["top_own_us"] = top_own_us(stats, steps)
            row["calls_per_step"] = sum(v[1] for v in stats.values()) // steps
        rows.append(row)
        for i in range(n):
            engine.abort(f"b{n}-{i}")
        while engine.has_work():
            engine.step()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", default="1,32,128,256")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--before", help="another checkout to measure the same way (the code before a change)")
    ap.add_argument("--tree", default=str(REPO), help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    if args.before is None:
        for row in measure(Path(args.tree), sizes, args.steps, args.prompt_len, args.profile):
            print(json.dumps(row), flush=True)
        return
    results = {}
    for tag, tree in (("before", Path(args.before).resolve()), ("after", REPO)):
        cmd = [sys.executable, __file__, "--tree", str(tree), "--batch-sizes", args.batch_sizes,
               "--steps", str(args.steps), "--prompt-len", str(args.prompt_len)] + (["--profile"] if args.profile else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[tag] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        for row in results[tag]:
            print(json.dumps({"which": tag, **row}), flush=True)
    for b, a in zip(results["before"], results["after"]):
        print(json.dumps({"batch": a["batch"], "before_us": b["us_per_step"], "after_us": a["us_per_step"],
                          "speedup": round(b["us_per_step"] / a["us_per_step"], 2)}), flush=True)


if __name__ == "__main__":
    main()
