"""Why compiled prefill looked wrong on mixture-of-experts models on CUDA (twenty-first session:
with engine.compile_prefill the tiny Mixtral / Qwen3-MoE in bf16 gave first tokens outside bf16
generate's top-5; uncompiled they were identical), and what compiling them is worth. Twenty-second
session's answer (benchmarks/README.md): bf16 rounding, either side as near the fp32 model; the
compiled engine faster. CUDA only; one JSON line per comparison:

  hf/<family>/<dtype>       transformers' own forward on a prompt, eager vs torch.compile(dynamic)
  experts/<family>/<dtype>  the first layer's experts alone on the same hidden states and routing
  grouped_mm/<dtype>        torch's grouped_mm eager vs compiled, groups of 1-40 rows (unaligned)
  engine/<family>           pdserve's first tokens with compile_prefill on vs off (the
                            twenty-first session's default turned it off for MoE models)
  truth/<family>            bf16 eager and bf16 compiled, each against the fp32 eager forward
                            (which of the two is nearer the fp32 model)
  speed/<shape>             a mid-size random Mixtral's forward over a long prompt, eager vs
                            compiled (CUDA events, median of 10)
  engine_speed/moe-shape    pdserve's engine on model_shapes.py's moe-shape: 2048-token prefill
                            latency and batch-8 decode, compiled (the defaults) vs not

Each line: max |difference| of the outputs, the rows whose argmax differs, and for the engine the
first tokens and their logprobs."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tiny_models import build_tiny_checkpoint  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "pdserve-moe-probe"
PROMPTS = [list(range(5, 37)), list(range(100, 161)), [3] * 41, list(range(70, 75))]


def emit(name: str, **fields) -> None:
    print(json.dumps({"probe": name, **fields}), flush=True)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    rows = (a.argmax(-1) != b.argmax(-1)).reshape(-1)
    return {"max_abs": round((a - b).abs().max().item(), 6), "scale": round(a.abs().max().item(), 4),
            "argmax_differs": int(rows.sum().item()), "rows": int(rows.numel())}


def experts_module(model):
    layer = model.model.layers[0]
    moe = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe")
    return moe


@torch.no_grad()
def hf_and_experts(family: str, d: str, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM

    tag = str(dtype).removeprefix("torch.")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).cuda().eval()
    impl = getattr(model.config, "_experts_implementation", None)
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([p], device="cuda")
        eager = model(input_ids=ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, dynamic=True)(input_ids=ids).logits
        emit(f"hf/{family}/{tag}", prompt=i, tokens=len(p), experts_implementation=impl, **diff(eager, compiled))
    # the experts of layer 0 alone, on hidden states and routing from the eager router
    moe = experts_module(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (5, 32, 61, 200):
        h = torch.randn(n, model.config.hidden_size, device="cuda", generator=g).to(dtype)
        _, w, idx = moe.gate(h)
        eager = moe.experts(h, idx, w)
        torch._dynamo.reset()
        compiled = torch.compile(moe.experts, dynamic=True)(h, idx, w)
        counts = torch.bincount(idx.reshape(-1), minlength=moe.experts.num_experts).tolist()
        emit(f"experts/{family}/{tag}", tokens=n, per_expert=counts, **diff(eager, compiled))
    del model
    torch.cuda.empty_cache()


@torch.no_grad()
def grouped_mm(dtype: torch.dtype) -> None:
    mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    tag = str(dtype).removeprefix("torch.")
    g = torch.Generator(device="cuda").manual_seed(1)
    for sizes in ([1, 3, 0, 6], [16, 16, 16, 16], [7, 20, 33, 2], [40, 1, 1, 38]):
        x = torch.randn(sum(sizes), 64, device="cuda", generator=g).to(dtype)
        w = torch.randn(len(sizes), 64, 96, device="cuda", generator=g).to(dtype)
        offs = torch.cumsum(torch.tensor(sizes, device="cuda"), 0, dtype=torch.int32)
        try:
            eager = mm(x, w, offs=offs)
            torch._dynamo.reset()
            compiled = torch.compile(lambda a, b, o: mm(a, b, offs=o), dynamic=True)(x, w, offs)
            emit(f"grouped_mm/{tag}", sizes=sizes, **diff(eager, compiled))
        except Exception as e:  # noqa: BLE001 (a probe: report the failure and go on)
            emit(f"grouped_mm/{tag}", sizes=sizes, error=f"{type(e).__name__}: {str(e)[:300]}")


@torch.no_grad()
def truth(family: str, d: str) -> None:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, dynamic=True)
    g = torch.Generator().manual_seed(3)
    tot = {"eager": [0, 0.0], "compiled": [0, 0.0]}
    rows = 0
    for i in range(12):
        p = torch.randint(3, model.config.vocab_size, (int(torch.randint(5, 120, (1,), generator=g)),), generator=g)
        ids = p[None].cuda()
        want = ref(input_ids=ids).logits.float()
        for name, fn in (("eager", model), ("compiled", compiled)):
            got = fn(input_ids=ids).logits.float()
            tot[name][0] += int((got.argmax(-1) == want.argmax(-1)).sum())
            tot[name][1] += float((got - want).abs().mean(-1).sum())
        rows += ids.numel()
    emit(f"truth/{family}", rows=rows, **{f"{k}_argmax_as_fp32": v[0] for k, v in tot.items()},
         **{f"{k}_mean_abs_vs_fp32": round(v[1] / rows, 5) for k, v in tot.items()})


@torch.no_grad()
def speed() -> None:
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.MixtralConfig(hidden_size=2048, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                           num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                           max_position_embeddings=4096, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model.forward, dynamic=True)
    for n in (512, 2048):
        ids = torch.randint(3, cfg.vocab_size, (1, n), device="cuda")
        out = {}
        for name, fn in (("eager", model), ("compiled", compiled)):
            for _ in range(3):
                fn(input_ids=ids, logits_to_keep=1)
            times = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(input_ids=ids, logits_to_keep=1)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            out[name] = round(sorted(times)[5], 3)
        emit("speed/mixtral-2048h-8x2816-8l", tokens=n, eager_ms=out["eager"], compiled_ms=out["compiled"],
             speedup=round(out["eager"] / out["compiled"], 3))


def engine_first_tokens(family: str, d: str) -> None:
    from tests.workers.engine.helpers import run_all
    from workers.engine.config import EngineConfig, ModelConfig
    from workers.engine.engine import Engine
    from workers.protocol import SamplingParams

    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    runs = {}
    for compiled in (False, True):
        e = Engine(ModelConfig(device="cuda", dtype="bfloat16"),
                   EngineConfig(block_size=4, num_kv_blocks=128, max_num_batched_tokens=64, max_num_seqs=8,
                                compile_prefill=compiled, compile_decode=False), d)
        runs[compiled] = run_all(e, PROMPTS, sp)
        del e
        torch.cuda.empty_cache()
    for k in runs[False]:
        emit(f"engine/{family}", prompt=k, eager=runs[False][k], compiled=runs[True][k],
             same=runs[False][k] == runs[True][k])


def engine_speed() -> None:
    """pdserve's engine on moe-shape (bf16): a 2048-token prefill's latency (one request, max_tokens
    1, median of 7) and batch-8 decode throughput, compiled (the CUDA defaults) vs compile_decode and
    compile_prefill off, one engine after the other."""
    import time

    from benchmarks.model_shapes import checkpoint
    from workers.engine.config import EngineConfig, ModelConfig
    from workers.engine.engine import Engine
    from workers.protocol import SamplingParams

    d = checkpoint("moe-shape", CACHE)
    g = torch.Generator().manual_seed(0)
    for compiled in (True, False):
        t0 = time.perf_counter()
        e = Engine(ModelConfig(device="cuda", dtype="bfloat16"),
                   EngineConfig(block_size=16, num_kv_blocks=2048, blocks_per_segment=256, max_num_seqs=8,
                                max_num_batched_tokens=2048, max_model_len=4096,
                                compile_decode=compiled, compile_prefill=compiled), d)
        start = time.perf_counter() - t0

        def run(e, prompts, max_tokens):
            sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            for i, p in enumerate(prompts):
                e.add_request(f"s{time.perf_counter_ns()}-{i}", p, sp)
            t = time.perf_counter()
            while e.has_work():
                e.step()
            return time.perf_counter() - t

        long = lambda: [torch.randint(3, 32000, (2048,), generator=g).tolist()]  # noqa: E731
        for _ in range(2):
            run(e, long(), 1)
        prefill = sorted(run(e, long(), 1) for _ in range(7))[3]
        batch = [torch.randint(3, 32000, (128,), generator=g).tolist() for _ in range(8)]
        run(e, batch, 8)
        took = run(e, batch, 129)
        emit("engine_speed/moe-shape", compiled=compiled, start_s=round(start, 1),
             prefill_2048_ms=round(prefill * 1e3, 2), batch8_decode_tok_s=round(8 * 128 / took, 1),
             graphs=e.runner.graphs is not None)
        del e
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="mixtral,qwen3_moe")
    ap.add_argument("--only", default="hf,grouped_mm,engine")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("moe_compile_probe.py needs a CUDA device")
    only = set(args.only.split(","))
    if "speed" in only:
        speed()
    if "engine_speed" in only:
        engine_speed()
    if "grouped_mm" in only:
        for dtype in (torch.bfloat16, torch.float32):
            grouped_mm(dtype)
    for family in args.families.split(","):
        d = str(build_tiny_checkpoint(family, CACHE / f"tiny-{family}"))
        if "hf" in only:
            for dtype in (torch.bfloat16, torch.float32):
                try:
                    hf_and_experts(family, d, dtype)
                except Exception as e:  # noqa: BLE001
                    emit(f"hf/{family}/{dtype}", error=f"{type(e).__name__}: {str(e)[:300]}")
        if "truth" in only:
            truth(family, d)
        if "engine" in only:
            engine_first_tokens(family, d)


if __name__ == "__main__":
    main()
