#!/usr/bin/env bash
# Why a 2048-token prefill costs 31-35 ms inside a worker and 16-18 ms as a bare engine step (one
# H100, benchmarks/README.md "Latency floor"): one call on one GPU (~8 min), carrying .devbundle
# (../shared/DEVICE.md). Each step isolates one suspect and prints JSON lines under $OUT:
#   1. profile_prefill --cases loop,eager: the engine driven as a worker drives it (EngineLoop
#      thread, asyncio, the workers' GIL switch interval) vs the bare step, no Ray, no NIXL
#   2. latency_floor, disaggregated, default settings: the hop timers split prefill.prefill into
#      add_request, engine.handle_step and engine.handle_delivery
#   3. the same with NIXL's progress thread sleeping 2 ms between rounds (its UCX CUDA transports
#      poll the driver from another thread while the engine launches kernels)
set -uo pipefail
out=${OUT:-/tmp/prefill-overhead}
mkdir -p "$out"
. benchmarks/device_env.sh
timeout 200 python3 benchmarks/profile_prefill.py --cases loop,eager --num-prompts 8 \
  > "$out/loop.jsonl" 2> "$out/loop.err"
floor="benchmarks/latency_floor.py --device cuda --model llama-1b-shape --prompt-tokens 2048 --max-tokens 16
  --requests 20 --warmup 4 --num-cpus 16 --modes disaggregated"
timeout 200 python3 $floor --label default > "$out/floor_default.jsonl" 2> "$out/floor_default.err"
timeout 200 python3 $floor --label nixl-delay-2ms --set transfer.nixl_progress_delay_us=2000 \
  > "$out/floor_delay.jsonl" 2> "$out/floor_delay.err"
for f in loop floor_default floor_delay; do grep -h '^{' "$out/$f.jsonl" | cut -c1-900; done
# 4. the prefill attention kernel with the diagonal split (split_diagonal, off by default until
#    this shows it faster; gpu_check.py --only kernels first)
timeout 120 python3 benchmarks/gpu_check.py --only kernels > "$out/check_kernels.jsonl" 2> "$out/check_kernels.err"
timeout 200 python3 benchmarks/profile_prefill.py --cases eager --num-prompts 4 --tiles 64x64x4,64x64x4s,128x128x8x2s \
  > "$out/split.jsonl" 2> "$out/split.err"
grep -h '^{' "$out/check_kernels.jsonl" "$out/split.jsonl" | cut -c1-600
