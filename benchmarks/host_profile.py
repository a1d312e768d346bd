"""Where a decode step's HOST time goes (issue 8: batch32 is host-bound on the lent H200: an async
engine step takes ~2.1 ms while the decode graph replays in ~1.35 ms).

    python3 benchmarks/host_profile.py --device cuda --batch-sizes 1,32
    .venv/bin/python benchmarks/host_profile.py --device cpu --model tiny --batch-sizes 32   # CPU

Per batch size: ``n`` requests decode in steady state (prefilled first); 50 async steps timed bare,
then 100 with a perf_counter timer around each phase (``bare_phases_us``: inclusive µs per step,
no profiler; ``wait`` is the host blocked on the device's tokens), then 100 under cProfile. One
JSON line per batch size: the bare step (ms), the step's phases (cumulative µs per step of the
engine's own functions, cProfile-inflated) and the top functions by own time (µs per step). ``result`` is where the host waits for the device (async: for the previous step);
host-bound when it is near zero.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.engine import build_model, prompts  # noqa: E402
from benchmarks.profile_top import run_profiled, top_own_us  # noqa: E402
from workers.engine.config import EngineConfig, ModelConfig  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.protocol import SamplingParams  # noqa: E402

# engine functions whose cumulative time makes up a step (file suffix, function name)
PHASES = {"step": ("engine.py", "step"), "schedule": ("scheduler.py", "schedule"),
          "launch": ("engine.py", "_launch"), "pack": ("step_inputs.py", "pack"),
          "execute": ("model_runner.py", "execute"), "sample": ("sampler.py", "sample"),
          "resolve": ("engine.py", "_resolve"), "result": ("sampler.py", "result"),
          "append_token": ("engine.py", "_append_token"), "publish_blocks": ("engine.py", "_publish_blocks"),
          "retire": ("engine.py", "_retire_length_finished")}


def timed_phases(engine: Engine, steps: int) -> tuple[float, dict]:
    """``steps`` engine steps with a perf_counter timer around each phase: (median step ms, phase ->
    [inclusive µs per step, calls per step]). Instance methods are wrapped on the instance, the
    rest on their class, and all are put back after."""
    from workers.engine.sampler import DeviceSample
    from workers.engine.step_inputs import StepInputs

    runner = engine.runner
    targets = {"retire": (engine, "_retire_length_finished"), "schedule": (engine.scheduler, "schedule"),
               "launch": (engine, "_launch"), "pack": (StepInputs, "pack"), "execute": (runner, "execute"),
               "prepare": (runner.backend, "prepare"), "sample": (engine.sampler, "sample"),
               "resolve": (engine, "_resolve"), "wait": (DeviceSample, "result"),
               "append_token": (engine, "_append_token"), "publish_blocks": (engine, "_publish_blocks")}
    if runner.graphs is not None:
        targets["replay"] = (runner.graphs, "_replay")
    acc = {name: [0.0, 0] for name in targets}
    undo = []

    def timer(name, fn):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                cell = acc[name]
                cell[0] += time.perf_counter() - t0
                cell[1] += 1
        return wrapped

    for name, (obj, attr) in targets.items():
        if isinstance(obj, type):  # a class: wrap the raw function (classmethods keep their binding)
            raw = obj.__dict__[attr]
            if isinstance(raw, classmethod):
                setattr(obj, attr, classmethod(timer(name, raw.__func__)))
            else:
                setattr(obj, attr, timer(name, raw))
            undo.append(lambda obj=obj, attr=attr, raw=raw: setattr(obj, attr, raw))
        else:
            setattr(obj, attr, timer(name, getattr(obj, attr)))
            undo.append(lambda obj=obj, attr=attr: delattr(obj, attr))
    times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
    finally:
        for u in undo:
            u()
    return (round(statistics.median(times) * 1e3, 3),
            {name: [round(us * 1e6 / steps, 1), round(n / steps, 2)] for name, (us, n) in acc.items()})


def profile_steps(engine: Engine, steps: int) -> tuple[dict, list]:
    stats = run_profiled(engine.step, steps)
    phases = {}
    for name, (suffix, func) in PHASES.items():
        cum = [v[3] for (f, _, fn), v in stats.items() if f.endswith(suffix) and fn == func]
        phases[name] = round(sum(cum) * 1e6 / steps, 1) if cum else None
    return phases, top_own_us(stats, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="llama-1b-shape")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "bench-models"))
    ap.add_argument("--gemv", action="store_true")
    args = ap.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    cuda = args.device == "cuda"
    engine = Engine(ModelConfig(device=args.device, dtype="bfloat16" if cuda else "float32"),
                    EngineConfig(block_size=16, num_kv_blocks=max(sizes) * 40 + 64, blocks_per_segment=256,
                                 max_num_batched_tokens=4096, max_num_seqs=max(sizes), max_model_len=640,
                                 compile_decode=cuda, gemv=args.gemv),
                    build_model(args.model, Path(args.cache_dir)))
    engine.async_scheduling = True
    for n in sizes:
        sp = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        for i, p in enumerate(prompts(n, args.prompt_len, engine.vocab_size, n)):
            engine.add_request(f"h{n}-{i}", p, sp)
        for _ in range(-(-n * args.prompt_len // 4096) + 3):
            engine.step()
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        timed_ms, bare = timed_phases(engine, 100)
        phases, top = profile_steps(engine, 100)
        print(json.dumps({"batch": n, "device": args.device, "async_step_ms": round(statistics.median(times) * 1e3, 3),
                          "timed_step_ms": timed_ms, "bare_phases_us": bare, "phases_us": phases,
                          "top_own_us": top}), flush=True)
        for i in range(n):
            engine.abort(f"h{n}-{i}")
        while engine.scheduler.running or engine._in_flight is not None:
            engine.step()


if __name__ == "__main__":
    main()
