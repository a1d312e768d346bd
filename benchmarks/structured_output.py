"""Structured output's cost in the engine: the same batch decoded free and under a grammar, in one
run on one engine.

Each of N requests (random token-id prompts, greedy, EOS ignored) decodes --out-len tokens:
  free        no constraint
  grammar     a JSON schema that cannot end before --out-len tokens (an array of at least 1000
              strings), so both runs decode the same number of tokens; every step fills each
              request's next-token bitmask (xgrammar) and masks its logits; the token a mask
              needs is read after the next step's forward pass is queued (the host's grammar
              work overlaps it)

Prints one JSON line per batch size (``--batch 1,8,32``: one engine, each in turn): tokens/s of both, their ratio (grammar / free), the mean time per step of
filling the bitmasks (host), the compile time of the schema (first request, then cached), and
``grammar_valid``: every grammar request's output replayed through a fresh matcher of the schema
(a mask that let a wrong token through, on any device, fails it; the run then exits 1).

    .venv/bin/python benchmarks/structured_output.py                     # default model, CPU
    python3 benchmarks/structured_output.py --device cuda --model llama-1b-shape --batch 32 \
        --tokenizer-from DIR      # a shape's word-level tokenizer has no JSON characters: borrow one
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.model_shapes import checkpoint  # noqa: E402
from workers.engine import sampling_constraints  # noqa: E402
from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.structured_output import GrammarState  # noqa: E402
from workers.protocol import InvalidRequestError, SamplingParams, StructuredOutput  # noqa: E402

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1000}


def run(engine: Engine, prompts, sampling: SamplingParams, tag: str) -> tuple[float, int, dict[str, list[int]]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, sampling)
    outputs: dict[str, list[int]] = {f"{tag}-{i}": [] for i in range(len(prompts))}
    t0 = time.perf_counter()
    while engine.has_work():
        for d in engine.step().deltas:
            outputs[d.request_id].extend(d.token_ids)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, sum(map(len, outputs.values())), outputs


def with_tokenizer(model: str, source: str, cache: Path) -> str:
    """A checkpoint dir: ``model``'s config and weights (links) with ``source``'s tokenizer files."""
    out = cache / f"{Path(model).name}+tokenizer-of-{Path(source).name}"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                       "vocab.json", "merges.txt"}
    for f in Path(model).iterdir():
        if f.name not in tokenizer_files and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    for name in tokenizer_files:
        if (Path(source) / name).exists():
            shutil.copy(Path(source) / name, out / name)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache/pdserve/models/SmolLM2-135M-Instruct"),
                    help="a checkpoint directory (with a tokenizer), 'tiny' or a shape of benchmarks/model_shapes.py")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench-models"), help="where shapes are built")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", default="8", help="requests decoded together; a comma list runs each in turn")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--out-len", type=int, default=64)
    ap.add_argument("--tokenizer-from", help="a checkpoint dir whose tokenizer replaces the model's")
    ap.add_argument("--profile", action="store_true", help="cProfile the grammar run: top functions to stderr")
    args = ap.parse_args()
    model = checkpoint(args.model, Path(args.cache_dir))
    if args.tokenizer_from:
        model = with_tokenizer(model, args.tokenizer_from, Path(args.cache_dir))
    batches = [int(b) for b in str(args.batch).split(",")]
    engine = Engine(ModelConfig(device=args.device), EngineConfig(block_size=16, num_kv_blocks=1024,
                                                                  max_num_seqs=max(64, *batches)), model)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    t0 = time.perf_counter()
    engine.grammars.compile(spec)
    compile_s = time.perf_counter() - t0
    fills = []
    fill = sampling_constraints.fill_bitmasks

    def timed_fill(rows, vocab_size, **kw):
        t = time.perf_counter()
        out = fill(rows, vocab_size, **kw)
        fills.append(time.perf_counter() - t)
        return out

    sampling_constraints.fill_bitmasks = timed_fill
    free = SamplingParams(max_tokens=args.out_len, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.out_len, temperature=0, ignore_eos=True, structured=spec)
    g = torch.Generator().manual_seed(0)
    failed = False
    for batch in batches:
        prompts = torch.randint(10, engine.vocab_size - 10, (batch, args.prompt_len), generator=g).tolist()
        run(engine, prompts, free, "warm")  # kernels, caches; then the grammar path's first use
        run(engine, prompts, dataclasses.replace(constrained, max_tokens=8), "warm-grammar")
        free_s, free_n, _ = run(engine, prompts, free, "free")
        if args.profile:
            import cProfile
            import pstats

            with cProfile.Profile() as prof:
                run(engine, prompts, constrained, "profiled")
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(20)
        fills.clear()
        grammar_s, grammar_n, outputs = run(engine, prompts, constrained, "grammar")
        valid = 0
        for tokens in outputs.values():
            try:
                GrammarState(engine.grammars.matcher(spec)).resume(tokens, spec.param)
                valid += 1
            except InvalidRequestError:
                pass
        failed |= valid != len(outputs)
        print(json.dumps({
            "benchmark": "structured_output", "device": args.device, "model": Path(model).name, "batch": batch,
            "prompt_len": args.prompt_len, "out_len": args.out_len, "async_scheduling": engine.async_scheduling,
            "free_tok_s": round(free_n / free_s, 1), "grammar_tok_s": round(grammar_n / grammar_s, 1),
            "ratio": round((grammar_n / grammar_s) / (free_n / free_s), 3), "tokens": [free_n, grammar_n],
            "fill_bitmask_ms_per_step": round(1e3 * sum(fills) / max(1, len(fills)), 3),
            "compile_ms": round(1e3 * compile_s, 2), "grammar_valid": f"{valid}/{len(outputs)}",
            "text_0": engine.tokenizer.decode(outputs["grammar-0"])[:120],
        }), flush=True)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
