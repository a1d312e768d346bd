"""Serving benchmark: open-loop Poisson load against the OpenAI endpoint (streaming), comparing
disaggregated (P prefill + D decode workers) with colocated (P + D workers doing both) serving,
and KV-aware with round-robin routing, in one run on the same hardware.

    .venv/bin/python benchmarks/serve.py --smoke                     # CPU, tiny model, < 5 min
    .venv/bin/python benchmarks/serve.py --profile cpu --plots benchmarks/results
    python3 benchmarks/serve.py --profile gpu --gpus-per-worker 0.5   # one GPU shared by P and D
    .venv/bin/python benchmarks/serve.py --url http://host:8000 --mode-label disaggregated \\
        --routing-label kv_aware --workloads multi_turn --rates 1,2   # a running cluster

Workloads (benchmarks/serve_workloads.py): prefill_heavy, decode_heavy, multi_turn. Each run is
one (mode, routing, workload, rate) and prints one JSON line: those four keys plus the summary
of benchmarks/serve_stats.py (TTFT / ITL / TPOT / e2e percentiles, throughput_tok_s,
goodput_rps = requests/s meeting BOTH the TTFT and the ITL target, slo_attainment, prefix hit
rate). The routing policies of one mode run interleaved at each rate, on the same workers;
every run has its own cache_salt, so no run reuses another's prefix cache. At the end, one
``"summary"`` line per workload: DistServe's max rate at >= 90 % SLO attainment per configuration
and the ratios the issue asks about.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.serve_client import cluster_events, model_id, run_load  # noqa: E402
from benchmarks.serve_clusters import (ALL_ROUTINGS, MODES, ROUTINGS, BenchEnv, config_override, start_cluster,  # noqa: E402
                                       worker_hop_times)
from benchmarks.serve_stats import SLO_SCALES, max_rate_at_attainment, percentile, summarize  # noqa: E402
from benchmarks.serve_workloads import WORKLOADS, WorkloadShape, build_workload  # noqa: E402


@dataclass(frozen=True)
class WorkloadPlan:
    shape: WorkloadShape
    rates: tuple[float, ...]
    ttft_slo_s: float
    itl_slo_s: float


@dataclass
class Profile:
    model: str
    device: str
    workloads: dict[str, WorkloadPlan]
    num_requests: int
    engine: dict = field(default_factory=dict)  # dotted config overrides
    token_range: tuple[int, int] = (10, 370)  # inside the tiny model's 384-token vocabulary
    num_warmup: int = 4


_CPU_ENGINE = {"engine.block_size": 8, "engine.num_kv_blocks": 512, "engine.blocks_per_segment": 64,
               "engine.max_num_batched_tokens": 256, "engine.max_num_seqs": 32, "model.device": "cpu",
               "pools.prefill.num_cpus": 0.1, "pools.decode.num_cpus": 0.1}
_CPU_WORKLOADS = {  # SLOs: TTFT 2 s, TPOT 100 ms (a 1-core worker decodes a step in ~10-40 ms)
    "prefill_heavy": WorkloadPlan(WorkloadShape(prompt_tokens=384, output_tokens=8), (0.5, 1.0, 2.0, 3.0), 2.0,
                                  0.1),
    "decode_heavy": WorkloadPlan(WorkloadShape(prompt_tokens=32, output_tokens=64), (1.0, 2.0, 4.0), 2.0, 0.1),
    # a conversation's own history outweighs the shared system prompt: a turn routed away from it
    # re-prefills up to ~300 tokens instead of its ~80-token tail
    "multi_turn": WorkloadPlan(WorkloadShape(prompt_tokens=0, output_tokens=16, system_tokens=64, user_tokens=64,
                                             num_turns=4), (1.0, 2.0, 4.0), 2.0, 0.1),
}
PROFILES = {
    "smoke": Profile("tiny", "cpu", {k: replace(v, rates=(2.0,)) for k, v in _CPU_WORKLOADS.items()
                                     if k in ("prefill_heavy", "multi_turn")}, num_requests=16, engine=_CPU_ENGINE,
                     num_warmup=2),
    "cpu": Profile("cpu-small-shape", "cpu", _CPU_WORKLOADS, num_requests=32, engine=_CPU_ENGINE),
    "gpu": Profile("llama-1b-shape", "cuda", {
        "prefill_heavy": WorkloadPlan(WorkloadShape(prompt_tokens=2048, output_tokens=16), (4.0, 8.0, 16.0, 24.0),
                                      0.4, 0.025),
        "decode_heavy": WorkloadPlan(WorkloadShape(prompt_tokens=128, output_tokens=256), (4.0, 16.0), 0.4, 0.025),
        # chat over a long input: every conversation has its own ~6k-token context (a document),
        # 4 turns; 24 conversations of ~7k tokens are ~10.7k KV blocks, more than one worker holds
        # (8192) but fewer than two: a router that keeps conversations in place serves turns >= 1
        # from cache, one that spreads them re-prefills the context wherever it lands.
        "multi_turn": WorkloadPlan(WorkloadShape(prompt_tokens=0, output_tokens=64, system_tokens=256,
                                                 context_tokens=6144, user_tokens=128, num_turns=4),
                                   (4.0, 8.0, 16.0), 0.4, 0.025),
    }, num_requests=96, engine={"engine.block_size": 16, "engine.num_kv_blocks": 8192,
                                "engine.blocks_per_segment": 256, "engine.max_num_batched_tokens": 2048,
                                "engine.max_num_seqs": 64, "model.device": "cuda", "pools.prefill.num_cpus": 1,
                                "pools.decode.num_cpus": 1, "limits.max_prompt_tokens": 32768},
        token_range=(10, 128000)),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="the CPU smoke run (= --profile smoke)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--url", help="benchmark this running endpoint instead of starting clusters")
    p.add_argument("--mode-label", choices=MODES, help="with --url: what the endpoint is")
    p.add_argument("--routing-label", choices=ALL_ROUTINGS, help="with --url: its router.policy")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--routings", default=",".join(ROUTINGS), help=f"comma list of {','.join(ALL_ROUTINGS)}; the "
                                                                "first is the cluster's own ingress")
    p.add_argument("--workloads", help=f"comma list of {','.join(WORKLOADS)} (default: the profile's)")
    p.add_argument("--rates", help="comma list of request rates (req/s), for every workload")
    p.add_argument("--num-requests", type=int, help="requests per run")
    p.add_argument("--ttft-slo", type=float, help="TTFT target (s), for every workload")
    p.add_argument("--itl-slo", type=float, help="TPOT/ITL target (s), for every workload")
    p.add_argument("--prefill", type=int, default=1, help="P: prefill workers (disaggregated)")
    p.add_argument("--decode", type=int, default=1, help="D: decode workers (disaggregated); colocated runs P+D")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="pools.*.num_gpus (default: 0 on cpu, 1 on cuda)")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: os.cpu_count())")
    p.add_argument("--model", help="tiny | llama-1b-shape | a checkpoint dir (default: the profile's)")
    p.add_argument("--overlap-weight", type=float, help="router.overlap_weight of the kv_aware policy (default: "
                                                         "the router's, 1.0 as Dynamo's)")
    p.add_argument("--set", action="append", default=[], type=config_override, metavar="KEY=VALUE",
                   help="a config override for the clusters, repeatable (e.g. router.prefill_queue_threshold=2); "
                        "echoed in every row")
    p.add_argument("--context-tokens", type=int, help="multi_turn: each conversation's own context (tokens)")
    p.add_argument("--num-kv-blocks", type=int, help="engine.num_kv_blocks per worker (default: the profile's)")
    p.add_argument("--engine-compile", choices=["on", "off"], default="on", help="engine.compile_decode (cuda)")
    p.add_argument("--token-range", help="LOW,HIGH: prompt token ids are drawn from [LOW, HIGH) (default: the "
                                        "profile's; with --url, keep it inside the served model's vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    p.add_argument("--plots", type=Path, help="write PNG plots here at the end")
    p.add_argument("--plot-prefix", default=None, help="PNG name prefix (default: the profile)")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "bench-models")
    p.add_argument("--run-dir", type=Path, default=None, help="etcd data and run files (default: a temp dir)")
    args = p.parse_args(argv)
    if args.smoke:
        args.profile = "smoke"
    bad = [r for r in args.routings.split(",") if r not in ALL_ROUTINGS]
    if bad:
        p.error(f"--routings: unknown {bad}; policies are {ALL_ROUTINGS}")
    args.overrides = dict(args.set)
    if args.url and args.set:
        p.error("--set configures the clusters this script starts, not a running one (--url)")
    if args.url and not (args.mode_label and args.routing_label):
        p.error("--url needs --mode-label and --routing-label (what the endpoint is)")
    return args


def plan_from(args) -> tuple[Profile, dict[str, WorkloadPlan]]:
    prof = PROFILES[args.profile]
    if args.token_range:
        low, high = (int(x) for x in args.token_range.split(","))
        prof = replace(prof, token_range=(low, high))
    names = args.workloads.split(",") if args.workloads else list(prof.workloads)
    plans = {}
    for name in names:
        if name not in WORKLOADS:
            raise SystemExit(f"--workloads: unknown {name!r}; workloads are {WORKLOADS}")
        plan = prof.workloads.get(name) or _CPU_WORKLOADS[name]
        if args.rates:
            plan = replace(plan, rates=tuple(float(r) for r in args.rates.split(",")))
        if args.ttft_slo:
            plan = replace(plan, ttft_slo_s=args.ttft_slo)
        if args.itl_slo:
            plan = replace(plan, itl_slo_s=args.itl_slo)
        if args.context_tokens is not None and name == "multi_turn":
            plan = replace(plan, shape=replace(plan.shape, context_tokens=args.context_tokens))
        plans[name] = plan
    return prof, plans


class Runner:
    def __init__(self, args, prof: Profile, plans: dict[str, WorkloadPlan]):
        self.args, self.prof, self.plans = args, prof, plans
        self.rows: list[dict] = []
        self.namespaces: dict[str, str] = {}  # endpoint URL -> its cluster's Ray namespace (clusters started here)
        self.num_requests = args.num_requests or prof.num_requests
        self.base = {"device": prof.device, "num_prefill": args.prefill, "num_decode": args.decode,
                     "seed": args.seed, "num_requests": self.num_requests}
        if args.overlap_weight is not None:
            self.base["overlap_weight"] = args.overlap_weight
        if args.set:
            self.base["overrides"] = args.overrides

    def emit(self, row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if self.args.out:
            with open(self.args.out, "a") as f:
                f.write(line + "\n")

    async def warm_up(self, url: str, model: str) -> None:
        """A few unmeasured requests per workload shape (first-use costs: allocations, kernels)."""
        for name, plan in self.plans.items():
            reqs = build_workload(name, plan.shape, self.prof.num_warmup, 100.0, self.args.seed + 999,
                                  self.prof.token_range)
            res = await run_load(url, model, reqs, salt=f"warmup-{uuid.uuid4().hex}")
            bad = [r.error for r in res if not r.ok]
            if bad:
                raise RuntimeError(f"warm-up requests to {url} failed: {bad[:3]}")

    async def measure(self, urls: dict[str, str], mode: str) -> None:
        model = await model_id(next(iter(urls.values())))
        for url in urls.values():
            await self.warm_up(url, model)
        for name, plan in self.plans.items():
            for rate in plan.rates:
                reqs = build_workload(name, plan.shape, self.num_requests, rate, self.args.seed, self.prof.token_range)
                for routing, url in urls.items():
                    # the cluster's own account of the run: only for clusters started here (an endpoint
                    # given with --url need not be pdserve, its /metrics not ours)
                    ours = url in self.namespaces
                    if ours:
                        before = await cluster_events(url)
                        self.hop_times(url)  # clears what earlier runs left in the workers' hop timers
                    results = await run_load(url, model, reqs, salt=f"{mode}-{routing}-{name}-{rate}-{uuid.uuid4().hex}")
                    shape = {"prompt_tokens": plan.shape.prompt_tokens, "output_tokens": plan.shape.output_tokens,
                             **({"context_tokens": plan.shape.context_tokens} if plan.shape.context_tokens else {})}
                    row = {"mode": mode, "routing": routing, "workload": name, "rate": rate, **self.base, **shape,
                           **summarize(results, plan.ttft_slo_s, plan.itl_slo_s)}
                    await asyncio.sleep(0.5)  # let the router's view of queues and counters settle
                    if ours:
                        after = await cluster_events(url)
                        row["events"] = {k: after[k] - before.get(k, 0.0) for k in after
                                         if after[k] != before.get(k, 0.0) and k != "kv_blocks_in_use"}
                        row["kv_blocks_in_use_after"] = after["kv_blocks_in_use"]  # idle: 0, else a leak
                        # the client's TTFT minus router_ttft_mean_s: the HTTP proxy's and the client's
                        # share; router_<path>_prefill_s: how long a prompt counted as pending, by path
                        means = {"router_ttft_mean_s": ("router_ttft_sum_s", "router_ttft_count"),
                                 **{f"router_{p}_prefill_s": (f"pending_s_{p}", f"pending_n_{p}")
                                    for p in ("local", "remote")}}
                        for field_name, (sum_key, count_key) in means.items():
                            took, n = row["events"].pop(sum_key, 0.0), row["events"].pop(count_key, 0)
                            if n:
                                row[field_name] = round(took / n, 4)
                        row["worker_hops_ms"] = self.hop_times(url)
                    self.rows.append(row)
                    self.emit(row)

    def hop_times(self, url: str) -> dict[str, dict]:
        """p50 / p90 / max / count (ms) of each worker hop since the last call, per role (engine.step: the
        engine loop's cadence; read, commit, prefill_call ...: a request's path). Only for
        clusters this run started (it reads the workers through Ray)."""
        pooled = worker_hop_times(url, self.namespaces[url])
        return {k: {"p50": round(percentile(v, 50) * 1e3, 3), "p90": round(percentile(v, 90) * 1e3, 3),
                    "max": round(max(v) * 1e3, 3), "n": len(v)}
                for k, v in sorted(pooled.items()) if v}

    def summaries(self) -> None:
        for name in self.plans:
            rows = [r for r in self.rows if r["workload"] == name]
            configs = sorted({(r["mode"], r["routing"]) for r in rows})
            out = {"summary": name}
            for label, key in (("max_rate_at_90pct_slo", "slo_attainment"), ("max_rate_at_90pct_slo_itl", "slo_attainment_itl")):
                out[label] = {f"{m}/{r}": max_rate_at_attainment(
                    [x for x in rows if (x["mode"], x["routing"]) == (m, r)], key=key) for m, r in configs}
            out.update(_ratios(rows))
            out["max_rate_at_90pct_slo_by_scale"] = _knees_by_scale(rows, configs)
            self.emit(out)


def _knees_by_scale(rows: list[dict], configs) -> dict:
    """Per SLO scale (serve_stats.SLO_SCALES): each configuration's highest rate at >= 90 % of
    requests within both scaled targets (TTFT + TPOT mean)."""
    out = {}
    for scale in SLO_SCALES:
        k = str(scale)
        out[k] = {f"{m}/{r}": max((x["rate"] for x in rows if (x["mode"], x["routing"]) == (m, r)
                                   and x.get("slo_attainment_by_scale", {}).get(k, 0) >= 0.9), default=None)
                  for m, r in configs}
    return out


def _ratios(rows: list[dict]) -> dict:
    """Per rate: disaggregated/colocated goodput (kv_aware) and round_robin/kv_aware TTFT p50 (each mode)."""
    def get(mode, routing, rate, key):
        for r in rows:
            if (r["mode"], r["routing"], r["rate"]) == (mode, routing, rate):
                return r[key]
        return None

    out: dict[str, dict] = {"goodput_disagg_over_coloc": {}, "goodput_itl_disagg_over_coloc": {},
                            "ttft_p50_rr_over_kv": {}}
    for rate in sorted({r["rate"] for r in rows}):
        for key, label in (("goodput_rps", "goodput_disagg_over_coloc"), ("goodput_itl_rps", "goodput_itl_disagg_over_coloc")):
            d, c = get("disaggregated", "kv_aware", rate, key), get("colocated", "kv_aware", rate, key)
            if d is not None and c is not None:
                out[label][str(rate)] = round(d / c, 3) if c else None
        for mode in MODES:
            rr = get(mode, "round_robin", rate, "ttft_p50_s")
            for policy, label in (("kv_aware", "ttft_p50_rr_over_kv"), ("cache_aware", "ttft_p50_rr_over_cache_aware")):
                p50 = get(mode, policy, rate, "ttft_p50_s")
                if p50 and rr:
                    out.setdefault(label, {})[f"{mode}@{rate}"] = round(rr / p50, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prof, plans = plan_from(args)
    runner = Runner(args, prof, plans)
    t0 = time.monotonic()
    if args.url:
        asyncio.run(runner.measure({args.routing_label: args.url.rstrip("/")}, args.mode_label))
    else:
        run_clusters(args, prof, runner)
    runner.summaries()
    if args.plots and runner.rows:
        from benchmarks.serve_report import plot

        for path in plot(runner.rows, args.plots, args.plot_prefix or args.profile):
            print(f"plot: {path}", file=sys.stderr)
    print(f"serve benchmark: {len(runner.rows)} runs in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return 0


def run_clusters(args, prof: Profile, runner: Runner) -> None:
    import tempfile

    from benchmarks.model_shapes import checkpoint
    from router.cluster_view import ray_namespace

    model_dir = checkpoint(args.model or prof.model, args.cache_dir)
    gpus = args.gpus_per_worker if args.gpus_per_worker is not None else (1.0 if prof.device == "cuda" else 0.0)
    num_gpus = 0
    if prof.device == "cuda":
        import torch

        num_gpus = torch.cuda.device_count()
        if num_gpus == 0:
            raise SystemExit("--profile gpu needs a CUDA device (torch.cuda.device_count() is 0)")
    base = {"model.path": model_dir, **prof.engine}
    if args.overlap_weight is not None:
        base["router.overlap_weight"] = args.overlap_weight
    if args.num_kv_blocks:
        base["engine.num_kv_blocks"] = args.num_kv_blocks
    if prof.device == "cuda":
        base["engine.compile_decode"] = args.engine_compile == "on"
    base.update(args.overrides)  # last: they win
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
    env = BenchEnv(run_dir, num_cpus=args.num_cpus or os.cpu_count() or 2, num_gpus=num_gpus).start()
    routings = tuple(args.routings.split(","))
    try:
        for mode in args.modes.split(","):
            started = time.monotonic()
            bench = start_cluster(env, mode, routings, base, args.prefill, args.decode, gpus)
            print(f"{mode}: cluster up in {time.monotonic() - started:.0f} s", file=sys.stderr)
            runner.namespaces.update(dict.fromkeys(bench.urls.values(), ray_namespace(bench.cluster.config.cluster_name)))
            try:
                asyncio.run(runner.measure(bench.urls, mode))
            finally:
                bench.stop()
    finally:
        env.stop()


if __name__ == "__main__":
    sys.exit(main())
