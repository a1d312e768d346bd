"""Structured output's cost in the engine: the same batch decoded free and under a grammar, in one
run on one engine.

Each of N requests (random token-id prompts, greedy, EOS ignored) decodes --out-len tokens:
  free        no constraint
  grammar     a JSON schema that cannot end before --out-len tokens (an array of at least 1000
              strings), so both runs decode the same number of tokens; every step fills each
              request's next-token bitmask (xgrammar) and masks its logits; such steps are
              resolved before the next is launched (async scheduling pauses)

Prints one JSON line: tokens/s of both, their ratio (grammar / free), the mean time per step of
filling the bitmasks (host), and the compile time of the schema (first request, then cached).

    .venv/bin/python benchmarks/structured_output.py                     # default model, CPU
    python3 benchmarks/structured_output.py --device cuda --model llama-1b-shape --batch 32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.model_shapes import checkpoint  # noqa: E402
from workers.engine import engine as engine_module  # noqa: E402
from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.protocol import SamplingParams, StructuredOutput  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1000}


def run(engine: Engine, prompts, sampling: SamplingParams, tag: str) -> tuple[float, int]:
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, sampling)
    n, t0 = 0, time.perf_counter()
    while engine.has_work():
        n += sum(len(d.token_ids) for d in engine.step().deltas)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache/pdserve/models/SmolLM2-135M-Instruct"),
                    help="a checkpoint directory (with a tokenizer), 'tiny' or a shape of benchmarks/model_shapes.py")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench-models"), help="where shapes are built")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out-len", type=int, default=64)
    args = ap.parse_args()
    model = checkpoint(args.model, Path(args.cache_dir))
    engine = Engine(ModelConfig(device=args.device), EngineConfig(block_size=16, num_kv_blocks=1024,
                                                                  max_num_seqs=max(64, args.batch)), model)
    vocab = engine.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, vocab - 10, (args.batch, args.prompt_len), generator=g).tolist()
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    engine.grammars.compile(spec)
    compile_s = time.perf_counter() - t0
    fills = []
    fill = engine_module.fill_bitmasks

    def timed_fill(rows, vocab_size):
        t = time.perf_counter()
        out = fill(rows, vocab_size)
        fills.append(time.perf_counter() - t)
        return out

    engine_module.fill_bitmasks = timed_fill
    free = SamplingParams(max_tokens=args.out_len, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.out_len, temperature=0, ignore_eos=True, structured=spec)
    run(engine, prompts, free, "warm")  # kernels, caches
    free_s, free_n = run(engine, prompts, free, "free")
    grammar_s, grammar_n = run(engine, prompts, constrained, "grammar")
    print(json.dumps({
        "benchmark": "structured_output", "device": args.device, "model": Path(model).name, "batch": args.batch,
        "prompt_len": args.prompt_len, "out_len": args.out_len, "async_scheduling": engine.async_scheduling,
        "free_tok_s": round(free_n / free_s, 1), "grammar_tok_s": round(grammar_n / grammar_s, 1),
        "ratio": round((grammar_n / grammar_s) / (free_n / free_s), 3), "tokens": [free_n, grammar_n],
        "fill_bitmask_ms_per_step": round(1e3 * sum(fills) / max(1, len(fills)), 3),
        "compile_ms": round(1e3 * compile_s, 2),
    }))


if __name__ == "__main__":
    main()
