"""Localise the illegal memory access seen with ``engine.gemv`` on (benchmarks/engine.py: after its
decode_b1 workload, in the batch32 warm-up; not reproduced under CUDA_LAUNCH_BLOCKING=1). CUDA only.

    python3 benchmarks/gemv_fault.py --case all      # each case in its own process
    python3 benchmarks/gemv_fault.py --case round2   # without the per-step sync (ROUND2 below)

Cases (engine.py's engine config, llama-1b-shape, gemv on unless said): ``b1_replay_batch``
(engine.py's order: one request decodes, the batch-1 graph is replayed bare 55 times, then 32
requests), ``batch`` (the 32 requests only), ``b1_batch`` (no bare replay), ``nogemv`` (engine.py's
order without the GEMV). The device is synchronised after every engine step, so the first step that
faults is named. One JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = ("b1_replay_batch", "batch", "b1_batch", "nogemv")
# the second round: without the per-step sync; "hf" runs transformers' static-cache generate (as
# engine.py does) between the decode and the bare replay; "blocking" is nosync under
# CUDA_LAUNCH_BLOCKING=1
ROUND2 = ("nosync", "nosync_hf", "nosync_blocking")  # --case round2 runs the first two


def run_case(case: str) -> dict:
    step_sync = not case.startswith("nosync")
    from benchmarks.engine import build_model, prompts
    from workers.engine.config import EngineConfig, ModelConfig
    from workers.engine.engine import Engine
    from workers.protocol import SamplingParams

    cfg = EngineConfig(block_size=16, num_kv_blocks=256 * 42 + 64, blocks_per_segment=1352, max_num_batched_tokens=16384,
                       max_num_seqs=256, max_model_len=1024, gemv=case != "nogemv")
    model_dir = build_model("llama-1b-shape", REPO / ".cache" / "bench-models")
    engine = Engine(ModelConfig(device="cuda", dtype="bfloat16"), cfg, model_dir)
    engine.async_scheduling = True
    phase, steps = "init", 0

    def drain(tag: str, batch: list[list[int]], out_len: int) -> None:
        nonlocal phase, steps
        phase = tag
        sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
        for i, p in enumerate(batch):
            engine.add_request(f"{tag}-{i}", p, sp)
        while engine.has_work():
            engine.step()
            if step_sync:
                torch.cuda.synchronize()
            steps += 1

    try:
        if case != "batch":
            drain("b1", prompts(1, 128, engine.vocab_size, 1), 129)
        if case == "nosync_hf":
            from transformers import AutoModelForCausalLM

            from benchmarks.engine import hf_generate
            phase = "hf_generate"
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda").eval()
            for _ in range(2):
                hf_generate(hf, prompts(1, 128, engine.vocab_size, 3), 129, "cuda")
        if case in ("b1_replay_batch", "nogemv") or case.startswith("nosync"):
            phase = "bare_replay"
            graph = engine.runner.graphs.graphs[1][0]
            for _ in range(55):
                graph.replay()
            torch.cuda.synchronize()
        engine.pool.reset_cache()
        drain("batch", prompts(32, 128, engine.vocab_size, 10), 128)
        return {"case": case, "ok": True, "steps": steps}
    except Exception as e:  # the point is to report where
        return {"case": case, "ok": False, "phase": phase, "step": steps, "error": str(e).splitlines()[0],
                "where": traceback.format_exc().splitlines()[-6:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="all", choices=("all", "round2", *CASES, *ROUND2))
    args = ap.parse_args()
    if args.case not in ("all", "round2"):
        print(json.dumps(run_case(args.case)), flush=True)
        return
    for case in (CASES[:3] if args.case == "all" else ROUND2[:2]):  # nogemv: engine.py's run without it was clean
        t0 = time.perf_counter()
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1") if case.endswith("blocking") else None
        p = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, timeout=150,
                           env=env)
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"case": case, "ok": False, "rc": p.returncode,
                                                   "stderr": p.stderr.splitlines()[-3:]}), flush=True)
        print(json.dumps({"case": case, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
