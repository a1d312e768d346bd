#!/usr/bin/env bash
# The disaggregation goal of issue 9 on 2 GPUs (nvidia-h200-x2 or -h100-x2), one call (~8 min),
# carrying .devbundle (../shared/DEVICE.md): prefill_heavy around the knee (48-96 req/s, 384 requests
# a run), 1 prefill + 1 decode worker (one GPU each) vs 2 colocated workers with the current defaults
# (router.stream_interval_tokens auto since the eighth session), then disaggregated with the prefill
# pool's own token budget (pools.prefill.engine.max_num_batched_tokens=8192). JSON lines under $OUT
# (each row with events, kv_blocks_in_use_after and worker_hops_ms); a summary last.
set -uo pipefail
out=${OUT:-/tmp/serve-gpu2}
mkdir -p "$out"
. benchmarks/device_env.sh
common="--profile gpu --workloads prefill_heavy --num-cpus 32 --gpus-per-worker 1 --routings kv_aware
  --rates 48,64,96 --num-requests 384"
t0=$SECONDS
timeout 330 python3 benchmarks/serve.py $common --out "$out/ph.jsonl" --plots "$out" > "$out/ph.log" 2>&1
echo "defaults rc=$? t=$((SECONDS-t0))"
timeout $((560-(SECONDS-t0))) python3 benchmarks/serve.py $common --modes disaggregated \
  --set pools.prefill.engine.max_num_batched_tokens=8192 --out "$out/ph_p8k.jsonl" > "$out/ph_p8k.log" 2>&1
echo "prefill budget 8192 rc=$? t=$((SECONDS-t0))"
python3 - "$out" <<'PY'
import json, pathlib, sys
for name in ("ph", "ph_p8k"):
    path = pathlib.Path(sys.argv[1]) / f"{name}.jsonl"
    if not path.exists():
        continue
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "goodput_rps" in r:
            hops = r.get("worker_hops_ms", {})
            print(name, {k: r.get(k) for k in ("mode", "rate", "goodput_rps", "slo_attainment", "slo_attainment_itl",
                                               "ttft_p50_s", "itl_p50_s", "tpot_p90_s", "events",
                                               "kv_blocks_in_use_after")},
                  {k: hops[k]["p50"] for k in ("decode.engine.step", "decode.reserve", "decode.commit") if k in hops})
PY
