#!/usr/bin/env bash
# The disaggregation goal of issue 9 on 2 GPUs (nvidia-h100-x2), one call (~9 min), carrying
# .devbundle (../shared/DEVICE.md): prefill_heavy, 1 prefill + 1 decode worker (one GPU each) vs 2
# colocated workers, with the current defaults; then disaggregated with conditional local prefill
# (router.prefill_queue_threshold=4) at the rates where one prefill worker saturates. JSON lines
# under $OUT; a summary of goodput (TTFT + TPOT mean, and every-gap ITL) per configuration last.
set -uo pipefail
out=${OUT:-/tmp/serve-gpu2}
mkdir -p "$out"
. benchmarks/device_env.sh
common="--profile gpu --workloads prefill_heavy --num-cpus 32 --gpus-per-worker 1"
t0=$SECONDS
timeout 330 python3 benchmarks/serve.py $common --rates 24,32,48 --out "$out/ph.jsonl" > "$out/ph.log" 2>&1
echo "defaults rc=$? t=$((SECONDS-t0))"
timeout $((560-(SECONDS-t0))) python3 benchmarks/serve.py $common --modes disaggregated --rates 32,48 \
  --set router.prefill_queue_threshold=4 --out "$out/ph_q4.jsonl" > "$out/ph_q4.log" 2>&1
echo "queue threshold rc=$? t=$((SECONDS-t0))"
python3 - "$out" <<'PY'
import json, pathlib, sys
for name in ("ph", "ph_q4"):
    path = pathlib.Path(sys.argv[1]) / f"{name}.jsonl"
    if not path.exists():
        continue
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "goodput_rps" in r:
            print(name, {k: r.get(k) for k in ("mode", "routing", "rate", "goodput_rps", "goodput_itl_rps",
                                               "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "throughput_tok_s")})
PY
