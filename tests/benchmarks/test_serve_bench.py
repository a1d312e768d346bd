"""CI smoke run of benchmarks/serve.py: both modes (disaggregated, colocated) with the kv_aware
routing policy on the CPU with the tiny model, reduced to one small workload (round_robin, the
baseline of real runs, is the same harness with another router.policy: left out to save CI two
cluster starts). It must print one well-formed JSON
line per configuration, a summary line, and the plots. No timing is asserted: speed is read off
the numbers, not tested."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("mode", "routing", "rate", "goodput_rps", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "throughput_tok_s")
NUM_REQUESTS = 6
# 6 req/s instead of the smoke profile's 2: the 6 requests (2 conversations x 3 turns) arrive within
# ~1 s instead of ~4 s, and a turn still comes >= 0.18 s after its conversation's previous one
# (>= 0.25 s at 2 req/s; a turn's prefill takes ~0.07 s here), so it can still hit that turn's prefix
RATE = 6.0


def test_serve_benchmark_smoke(tmp_path, tiny_checkpoint):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # --smoke's model "tiny" is the suite's tiny llama (CACHE/tiny-llama): built once per session
    cache_dir = Path(tiny_checkpoint("llama")).parent
    cmd = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--smoke", "--workloads", "multi_turn",
           "--routings", "kv_aware",
           "--num-requests", str(NUM_REQUESTS), "--rates", str(RATE), "--plots", str(tmp_path / "plots"),
           "--run-dir", str(tmp_path / "run"), "--cache-dir", str(cache_dir)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"benchmark failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    rows = [x for x in lines if "summary" not in x]
    assert sorted((x["mode"], x["routing"]) for x in rows) == [("colocated", "kv_aware"),
                                                               ("disaggregated", "kv_aware")], r.stdout
    for row in rows:
        where = f"{row['mode']}/{row['routing']}"
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"{where}: missing {missing}"
        assert row["workload"] == "multi_turn" and row["device"] == "cpu" and row["rate"] == RATE
        assert row["num_requests"] == NUM_REQUESTS and row["num_failed"] == 0, (where, row.get("errors"))
        for key in REQUIRED[2:]:
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] >= 0, (where, key, row)
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"] and row["itl_p50_s"] > 0, (where, row)
        assert 0 < row["throughput_tok_s"] and 0 <= row["slo_attainment"] <= 1, (where, row)
        # goodput counts only finished requests over the run's duration
        assert row["goodput_rps"] <= 1.001 * row["num_ok"] / row["duration_s"], (where, row)  # (both rounded)
        # later turns of a conversation repeat their previous turn's prompt: some cache hits
        assert 0 < row["prefix_hit_rate"] < 1, (where, row)
        # the cluster's own account of the run (its /metrics): KV moved only between disaggregated
        # workers, and once the run is over no KV block is still referenced anywhere (no leak)
        assert (row["events"].get("kv_transfers", 0) > 0) == (row["mode"] == "disaggregated"), (where, row["events"])
        assert row["kv_blocks_in_use_after"] == 0, (where, row)
        # nothing compiled inside the run on any worker (each compile would stall its engine)
        assert "compiles_while_serving" not in row["events"], (where, row["events"])
        # the router's decisions, by reason: every request of the run was routed (a retry routes again)
        # the endpoint's own TTFT (from its replica's histogram) is part of what the client waited
        assert 0 < row["router_ttft_mean_s"] <= row["ttft_mean_s"], (where, row)
        # the router's own clock of each prompt's prefill (routing -> its first token back): at most its TTFT
        for path in ("local", "remote"):
            if f"router_{path}_prefill_s" in row:
                assert 0 < row[f"router_{path}_prefill_s"] <= row["ttft_p99_s"], (where, path, row)
        assert ("router_remote_prefill_s" in row) == (row["mode"] == "disaggregated"), (where, row)
        routed = {k: v for k, v in row["events"].items() if k.startswith("routed_")}
        assert sum(routed.values()) >= NUM_REQUESTS, (where, row["events"])
        assert ("routed_disaggregated" in routed) == (row["mode"] == "disaggregated"), (where, routed)
        # the workers' own timings of the run: the decode worker stepped, p50 <= p90
        step = row["worker_hops_ms"]["decode.engine.step"]
        assert step["n"] > 0 and 0 < step["p50"] <= step["p90"] <= step["max"], (where, row["worker_hops_ms"])
        # every request reached its decode worker (routed -> generate(): the call's transit and queue)
        assert row["worker_hops_ms"]["decode.dispatch"]["n"] >= NUM_REQUESTS, (where, row["worker_hops_ms"])
    (summary,) = [x for x in lines if "summary" in x]
    assert summary["summary"] == "multi_turn" and set(summary["max_rate_at_90pct_slo"]) == {
        "disaggregated/kv_aware", "colocated/kv_aware"}
    knees = summary["max_rate_at_90pct_slo_by_scale"]  # scale 1 is the verdict above
    assert knees["1.0"] == summary["max_rate_at_90pct_slo"], summary
    (png,) = (tmp_path / "plots").glob("*.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
