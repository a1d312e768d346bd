#!/usr/bin/env bash
# The disaggregation goal of issue 9 on 2 GPUs (nvidia-h200-x2 or -h100-x2), one call (~9 min),
# carrying .devbundle (../shared/DEVICE.md): prefill_heavy around the knee (384 requests a run),
# 1 prefill + 1 decode worker (one GPU each) vs 2 colocated workers. Since the ninth session the
# router takes every decode worker's tokens through one stream per (router process, worker)
# (router.token_streams=per_worker); the disaggregated runs give the prefill pool its own token
# budget (pools.prefill.engine.max_num_batched_tokens=8192, the fifth round's best), and the
# per-request streams run again beside them as the baseline. JSON lines under $OUT (each row with
# events, kv_blocks_in_use_after and worker_hops_ms); a summary last.
#   usage: benchmarks/serve_gpu2.sh [streams|knees|hybrid|hybrid_ttft|hybrid_caps|hybrid_vs_coloc]
#   streams (default): the above; knees: each mode past its knee (disaggregated 48-96, colocated
#   64-160 req/s), rows with the attainment per SLO scale; hybrid: disaggregated at 96/128 req/s
#   with conditional disaggregation (router.prefill_queue_threshold 4 and 8: the decode worker
#   prefills locally while every prefill worker has that many queued); hybrid_ttft: the same
#   cluster at 96/128 req/s, pure disaggregation vs router.conditional_disaggregation=ttft (the
#   router keeps a prompt on the decode worker when its estimated TTFT is smaller there) with the
#   decode worker's pending local prefill capped at 4096 and 2048 tokens (2 and 1 prompts);
#   hybrid_caps: at 96 req/s only, off vs ttft with caps of 2048, 4096 and 8192 tokens;
#   hybrid_vs_coloc: ttft with the 2048-token cap vs colocated at 96/112/128 req/s;
#   itl_knee: the same two on one host (hybrid 96-160, colocated 32-96 req/s), for each mode's knee under both
#   SLO readings (TTFT + TPOT mean, TTFT + every ITL)
#   caps2 (next): the ttft rule's cap of pending local prompt tokens again, now that no compile
#   stalls a run (the seventh round's 4096 / 8192 caps lost, with Triton compiling inside serving
#   then): 2048 vs 4096 at 96 and 112 req/s. The ninth round's decode worker stepped in ~2 ms at
#   96-112 req/s (nearly idle) while remote prompts waited 81-554 ms for the prefill worker
#   knees4: the hybrid (80, 96) then colocated (48, 64, 96 req/s) on one host, as knees3 meant to
#   (nineteenth session: knees3's colocated cluster did not start: etcd's two automatic ports
#   coincided, fixed)
#   knees3: the hybrid (64-112) then colocated (32-96 req/s) on one host with the full warm-up;
#   rows carry router_ttft_mean_s (the client's TTFT minus it: proxy + client) and
#   router_local/remote_prefill_s (how long a prompt counted as pending: the ttft rule's cap)
#   warm_up: the hybrid as the first cluster on the host with empty compile caches, engine.warm_up
#   basic (64/80 req/s) vs the default full (64-96); the rows' jit.* hops are compiles inside the run
#   knees2: the hybrid at 64-96 and colocated at 40-56 req/s on one host (the rows count why the ttft
#   rule sent prompts away), the hybrid with a 16k prefill budget at 96/112, then (issue 8) the
#   attention's L2 prefetch at batch 1
set -uo pipefail
part=${1:-streams}
out=${OUT:-/tmp/serve-gpu2}
mkdir -p "$out"
. benchmarks/device_env.sh
common="--profile gpu --workloads prefill_heavy --num-cpus 32 --gpus-per-worker 1 --routings kv_aware
  --num-requests 384"
p8k="--modes disaggregated --set pools.prefill.engine.max_num_batched_tokens=8192"
t0=$SECONDS
run() {  # name, time limit (s), serve.py arguments...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 benchmarks/serve.py $common "$@" --out "$out/$name.jsonl" > "$out/$name.log" 2>&1
  echo "$name rc=$? t=$((SECONDS-t0))"
}
ttft="--set router.conditional_disaggregation=ttft --set router.prefill_rate_prior_tokens_per_s=200000
  --set router.local_prefill_rate_prior_tokens_per_s=100000"
if [ "$part" = caps2 ]; then  # one- and two-prompt caps at the hybrid's knee and past it
  run hybrid_ttft4k 260 $p8k --rates 96,112 $ttft --set router.local_prefill_max_pending_tokens=4096
  run hybrid_ttft2k $((570-(SECONDS-t0))) $p8k --rates 96,112 $ttft --set router.local_prefill_max_pending_tokens=2048
elif [ "$part" = knees4 ]; then  # both knees on one host, short
  run hybrid_ttft2k 230 $p8k --rates 80,96 $ttft --set router.local_prefill_max_pending_tokens=2048
  run colocated 190 --modes colocated --rates 48,64,96
elif [ "$part" = knees3 ]; then  # both knees on one host with the full warm-up, the router's share of TTFT read
  run hybrid_ttft2k 200 $p8k --rates 64,80,96,112 $ttft --set router.local_prefill_max_pending_tokens=2048
  run colocated 190 --modes colocated --rates 32,48,64,96
elif [ "$part" = warm_up ]; then  # the first cluster on a host, basic vs full engine warm-up, each with empty compile caches
  TRITON_CACHE_DIR=/tmp/tc_basic TORCHINDUCTOR_CACHE_DIR=/tmp/ic_basic \
    run hybrid_basic 150 $p8k --rates 64,80 $ttft --set router.local_prefill_max_pending_tokens=2048 --set engine.warm_up=basic
  TRITON_CACHE_DIR=/tmp/tc_full TORCHINDUCTOR_CACHE_DIR=/tmp/ic_full \
    run hybrid_ttft2k 175 $p8k --rates 64,80,96 $ttft --set router.local_prefill_max_pending_tokens=2048
elif [ "$part" = knees2 ]; then  # both knees on one host with the ttft rule's causes counted, then a prefill budget of 16k
  run hybrid_ttft2k 160 $p8k --rates 64,80,96 $ttft --set router.local_prefill_max_pending_tokens=2048
  run colocated 150 --modes colocated --rates 40,48,56
  run hybrid16k_ttft2k 150 --modes disaggregated --set pools.prefill.engine.max_num_batched_tokens=16384 --rates 96,112 \
    $ttft --set router.local_prefill_max_pending_tokens=2048
  # the attention's L2 prefetch under PDL at batch 1 (issue 8; one GPU of the two)
  timeout $((580-(SECONDS-t0))) python3 benchmarks/profile_decode.py --batch-sizes 1 \
    --decode-variants "kernel=split;kernel=split,prefetch=1" > "$out/prefetch.jsonl" 2> "$out/prefetch.err"
  echo "prefetch rc=$? t=$((SECONDS-t0))"
elif [ "$part" = itl_knee ]; then  # each mode's knee on one host, both SLO readings
  run hybrid_ttft2k 250 $p8k --rates 96,128,160 $ttft --set router.local_prefill_max_pending_tokens=2048
  run colocated $((570-(SECONDS-t0))) --modes colocated --rates 32,48,64,96
elif [ "$part" = hybrid_vs_coloc ]; then  # the ttft rule with a one-prompt cap vs 2 colocated workers past 96 req/s
  run hybrid_ttft2k 190 $p8k --rates 96,112,128 $ttft --set router.local_prefill_max_pending_tokens=2048
  run colocated $((385-(SECONDS-t0))) --modes colocated --rates 96,112,128
elif [ "$part" = hybrid_caps ]; then  # the ttft rule at 96 req/s: caps of 1, 2 and 4 prompts beside pure disaggregation
  run hybrid_off 150 $p8k --rates 96
  run hybrid_ttft4k 150 $p8k --rates 96 $ttft --set router.local_prefill_max_pending_tokens=4096
  run hybrid_ttft8k 150 $p8k --rates 96 $ttft --set router.local_prefill_max_pending_tokens=8192
  run hybrid_ttft2k $((570-(SECONDS-t0))) $p8k --rates 96 $ttft --set router.local_prefill_max_pending_tokens=2048
elif [ "$part" = hybrid_ttft ]; then
  run hybrid_off 190 $p8k --rates 96,128
  run hybrid_ttft4k 190 $p8k --rates 96,128 $ttft --set router.local_prefill_max_pending_tokens=4096
  run hybrid_ttft2k $((570-(SECONDS-t0))) $p8k --rates 96,128 $ttft --set router.local_prefill_max_pending_tokens=2048
elif [ "$part" = hybrid ]; then
  run hybrid_q4 190 $p8k --rates 96,128 --set router.prefill_queue_threshold=4
  run hybrid_q8 $((370-(SECONDS-t0))) $p8k --rates 96,128 --set router.prefill_queue_threshold=8
elif [ "$part" = knees ]; then
  run disagg 250 $p8k --rates 48,64,80,96
  run colocated $((540-(SECONDS-t0))) --modes colocated --rates 64,96,128,160
else
  run disagg 200 $p8k --rates 48,64,96
  run disagg_per_request 170 $p8k --rates 64,96 --set router.token_streams=per_request
  run colocated $((565-(SECONDS-t0))) --modes colocated --rates 64,96
fi
python3 - "$out" <<'PY'
import json, pathlib, sys
for name in ("disagg", "disagg_per_request", "colocated", "hybrid_q4", "hybrid_q8", "hybrid_off", "hybrid_ttft4k",
             "hybrid_ttft8k", "hybrid_ttft2k", "hybrid16k_ttft2k", "hybrid_basic"):
    path = pathlib.Path(sys.argv[1]) / f"{name}.jsonl"
    if not path.exists():
        continue
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "goodput_rps" in r:
            hops = r.get("worker_hops_ms", {})
            print(name, {k: r.get(k) for k in ("mode", "rate", "num_failed", "goodput_rps", "slo_attainment", "slo_attainment_itl",
                                               "goodput_itl_rps", "ttft_p50_s", "ttft_p90_s", "itl_p50_s", "itl_p99_s", "tpot_p90_s",
                                               "slo_attainment_by_scale", "events", "kv_blocks_in_use_after",
                                               "router_ttft_mean_s", "router_local_prefill_s",
                                               "router_remote_prefill_s", "ttft_mean_s", "overrides")},
                  {k: hops[k]["p50"] for k in ("decode.engine.step", "decode.reserve", "decode.commit", "decode.dispatch",
                                               "decode.first_delta") if k in hops},
                  {k: (v["n"], v.get("max")) for k, v in hops.items() if ".jit." in k or k.endswith("engine.step")})
PY
