"""The fixed per-request latency floor: sequential streaming requests (one at a time, so nothing
queues), colocated and disaggregated, with where the time goes.

    tests/run-isolated.sh .venv/bin/python benchmarks/latency_floor.py            # tiny model, CPU
    tests/run-isolated.sh .venv/bin/python benchmarks/latency_floor.py --requests 60 --modes disaggregated

Prints one JSON line per mode: client TTFT / e2e percentiles (ms), the router's own TTFT (mean,
from its Prometheus histogram: the ingress handler to its first delta), and the medians of each
worker-side step of the request path (``hop_times`` of every worker; ms):

    decode.first_delta      generate() entered -> its first delta ready to yield
    decode.cache_lookup     the decode engine's cached-prefix count (conditional disaggregation)
    decode.prefill_call     prefill.prefill.remote() -> KVHandle back (Ray call + the prefill)
    decode.reserve / handshake / read / release / commit      the import, step by step
    decode.local_add        add_request of a local prefill
    prefill.add_request     the prefill engine accepted the prompt (engine-thread round trip)
    prefill.prefill         prefill() entered -> handle ready (engine queue + the model's prefill)
    <role>.engine.handle_step      the engine step that finished a prefill (wall, on the engine thread)
    <role>.engine.handle_delivery  that step's end -> its handle resolved on the worker's event loop
    <role>.engine.delta_delivery   a step's end -> its token deltas on the worker's event loop

Every request has its own cache_salt: no request reuses another's prefix cache.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from benchmarks.model_shapes import checkpoint  # noqa: E402
from benchmarks.serve_clusters import MODES, BenchEnv, config_override, start_cluster, worker_hop_times  # noqa: E402
from benchmarks.serve_stats import percentile  # noqa: E402


def one_request(client: httpx.Client, url: str, body: dict) -> tuple[float, float]:
    """(TTFT, e2e) in seconds of one streaming completion, measured at the client."""
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if first is None and line.startswith("data:") and '"text"' in line:
                first = time.perf_counter() - t0
            if line.startswith("data:") and '"error"' in line:
                raise RuntimeError(f"stream error: {line[:300]}")
    return first, time.perf_counter() - t0


def router_ttft(client: httpx.Client, url: str) -> tuple[float, float]:
    """(sum, count) of the endpoint's pdserve_ttft_seconds histogram."""
    total = count = 0.0
    for line in client.get(url + "/metrics").text.splitlines():
        if line.startswith("pdserve_ttft_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("pdserve_ttft_seconds_count"):
            count = float(line.split()[-1])
    return total, count


def worker_hops(url: str, namespace: str) -> dict[str, float]:
    """Median ms of every worker's hop_times, keyed role.step (workers of a role pooled)."""
    return {k: round(statistics.median(v) * 1e3, 3) for k, v in sorted(worker_hop_times(url, namespace).items()) if v}


def measure(env: BenchEnv, mode: str, base: dict, args) -> dict:
    bench = start_cluster(env, mode, ("kv_aware",), base, 1, 1, args.gpus_per_worker)
    try:
        url = bench.urls["kv_aware"]
        namespace = f"pdserve-{bench.cluster.config.cluster_name}"
        rng = random.Random(0)
        with httpx.Client(timeout=60) as client:
            model = client.get(url + "/v1/models").json()["data"][0]["id"]

            def body():
                return {"model": model, "prompt": [rng.randrange(10, args.max_token_id) for _ in range(args.prompt_tokens)],
                        "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True,
                        "cache_salt": uuid.uuid4().hex}

            for _ in range(args.warmup):
                one_request(client, url, body())
            worker_hops(url, namespace)  # clears the warm-up's
            s0, c0 = router_ttft(client, url)
            results = [one_request(client, url, body()) for _ in range(args.requests)]
            s1, c1 = router_ttft(client, url)
            hops = worker_hops(url, namespace)
        ttft = [r[0] * 1e3 for r in results]
        e2e = [r[1] * 1e3 for r in results]
        return {
            "mode": mode, "requests": len(results), "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "ttft_ms_p50": round(percentile(ttft, 50), 2), "ttft_ms_p10": round(percentile(ttft, 10), 2),
            "ttft_ms_p90": round(percentile(ttft, 90), 2), "e2e_ms_p50": round(percentile(e2e, 50), 2),
            "router_ttft_ms_mean": round((s1 - s0) / max(1.0, c1 - c0) * 1e3, 2),
            "hops_ms_p50": hops,
        }
    finally:
        bench.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(reversed(MODES)), help="colocated,disaggregated")
    ap.add_argument("--model", default="tiny", help="'tiny', a benchmarks/model_shapes.py shape, or a directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="measure every mode this many times, interleaved")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--label", default="", help="copied into every line (e.g. before / after)")
    ap.add_argument("--gpus-per-worker", type=float, default=None, help="default: 0 on cpu, 0.5 on cuda (one GPU)")
    ap.add_argument("--set", action="append", default=[], type=config_override, metavar="KEY=VALUE",
                    help="a config override for the cluster, repeatable (VALUE parsed as JSON when it parses), e.g. "
                         "transfer.nixl_progress_delay_us=1000 or transfer.backend=tcp")
    args = ap.parse_args()
    overrides = dict(args.set)
    model = checkpoint(args.model, REPO / ".cache" / "bench-models")
    base = {"model.path": model, "model.device": args.device, "engine.block_size": 8, "engine.num_kv_blocks": 512,
            "engine.blocks_per_segment": 64, "pools.prefill.num_cpus": 0.1, "pools.decode.num_cpus": 0.1}
    args.max_token_id, num_gpus = 370, 0  # inside the tiny model's 384-token vocabulary
    if args.device == "cuda":  # the GPU serving benchmark's settings (benchmarks/serve.py --profile gpu)
        import torch

        from benchmarks.serve import PROFILES

        num_gpus = torch.cuda.device_count()
        base.update(PROFILES["gpu"].engine)
        args.max_token_id = PROFILES["gpu"].token_range[1]
    base.update(overrides)  # last: they win over the profile's settings
    if args.gpus_per_worker is None:
        args.gpus_per_worker = 0.5 if args.device == "cuda" else 0.0
    env = BenchEnv(Path(tempfile.mkdtemp(prefix="latency-floor-")), num_cpus=args.num_cpus, num_gpus=num_gpus).start()
    try:
        for rnd in range(args.rounds):
            for mode in args.modes.split(","):
                line = measure(env, mode, base, args)
                print(json.dumps({"bench": "latency_floor", "label": args.label, "round": rnd, "overrides": overrides,
                                  **line}), flush=True)
    finally:
        env.stop()


if __name__ == "__main__":
    main()
