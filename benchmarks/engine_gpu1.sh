#!/usr/bin/env bash
# Issue 8 on one GPU (nvidia-h100-x1), carrying .devbundle (../shared/DEVICE.md); each part is one
# call of < 10 min. JSON lines under $OUT; a summary last.
#   decode:  correctness (the split-KV decode path's own check, Triton kernels, decode graphs,
#            fused bf16 1B), engine.py decode_b1 + batch32 vs transformers generate with the
#            current defaults (the decode graphs per variant: the split part)
#   prefill: compile_prefill: token-identical + nothing compiled after the start-up warm-up, the
#            2048-token prefill step eager vs compiled, and the latency floor with it on vs off;
#            decode graphs == eager again; per-request KV READs on one GPU
#   split:   the split-KV decode with fixed-size chunks (helper-18): its GPU checks, then the decode
#            graphs per variant at short (128) and long (2048) prompts, batch 1/8/32, to decide
#            where it becomes the default
#   gemv:    the batch-1 Triton GEMV (engine.gemv) with the wide tiles gemv_probe.py found on an
#            H200: its GPU checks, where a decode step's host time goes (batch 1 and 32), and
#            engine.py decode_b1 + batch32 with and without it, in the same call
#   gemv_fault: engine.py's decode_b1 + batch32 with engine.gemv, the call that died with an illegal
#            memory access in the batch32 warm-up (H100 and H200, tenth session), first as is (does
#            it still?), then under compute-sanitizer memcheck (on the device image), which names
#            the faulting kernel and address; its log is $OUT/sanitizer.err
#   gemv_cause: engine.py --gemv with transformers' generate not compiled, then batch32 alone
#   attn32: decode attention tile variants not tried before, short and long contexts, batch 1/8/32
#   rope: engine.rope_table on/off (decode kernels, prefill step), its checks, engine.py
#   r13: inductor max-autotune for the decode graph's GEMMs (batch 1/32, with today's default
#            beside it), the same-GPU KV READ sweep (sync and 8 in flight), the split-out bf16 check,
#            the 2048-token prefill step with and without engine.rope_table
#   r13b: where a same-GPU READ in flight loses to a copy (host vs device time per READ, a memcpy
#            per slice), then inductor's coordinate-descent tuning of the decode graph's kernels
#   r13c: a strided READ as one cudaMemcpy2DAsync (sweep, 8 in flight, per-request READs), then
#            engine.tune_batch1 (batch 1 compiled alone with coordinate-descent tuning): engine.py
#            and the correctness checks with it
#   r13d: engine.tune_batch1 on and off, batch-1 decode graph and its kernels
#   r14: (next session) engine.tune_batch1 as built now (batch 1 = the symbolic compile's size-1
#            specialisation under coordinate-descent tuning) against off, batch 1 and 32, then the
#            checks with it on (graphs == eager, fp32 exact, bf16 1B) and the sampler with penalties
#            and logit_bias on CUDA (check_same), then engine.py with it on
#   fused_a..fused_e: engine.fused_decode (seventeenth session): its CUDA checks and decode graphs
#            beside the modules' graphs, the bf16 1B check and engine.py with it, a GEMV tile sweep,
#            then (fused_e) the defaults once it was made the default. Parts that measured ideas which
#            lost and were removed from the engine (their records: benchmarks/README.md, results/):
#            fused_f / gemm2 (eighteenth, nineteenth sessions; a tensor-core kernel for 2-32 rows,
#            two builds, 2-2.5x slower than cuBLAS), ahead (nineteenth: the o GEMV's L2 prefetch
#            of gate|up, slower at every size)
#   preload: the split decode kernel's first tile loaded before the PDL wait (decode_preload)
#   preload2: chunkings whose whole ~240-key context is preloaded (128-key chunks; one 256-key tile)
#   argmax: the in-graph greedy argmax; host phases; timeline; engine.py
#   host2: CUDA call costs on the host, the argmax checks, host phases with PinnedSlots (taken out)
#   blas: batch 8/32 graphs with cuBLASLt preferred, a bigger workspace, TunableOp (no change)
#   lt: cuBLASLt's algorithm candidates for the projections (benchmarks/cublaslt_probe.py; none wins)
#   families: the further model families (gpu_check more-families) and the kernels check
#   moe: MoE families in bf16 with the CUDA defaults (gpu_check moe-bf16)
#   capped: Gemma 2's attention cap on CUDA, torch backend then Triton (gpu_check capped-triton)
#   sinks: the kernels check with gpt-oss's attention sinks (gpu_check kernels)
#   mxfp4: gpt-oss's released MXFP4 layout dequantized at load (gpu_check mxfp4)
#   r23: the defaults' checks and engine.py decode_b1 / batch32 again (twenty-third session)
#   usage: benchmarks/engine_gpu1.sh r23b|r23|mxfp4|sinks|capped|moe|families2|families|lt|blas|host2|argmax|preload2|preload|decode|prefill|split|gemv|gemv_fault|gemv_cause|attn32|rope|r13|r13b|r13c|r13d|r14
set -uo pipefail
part=${1:?decode, prefill or split}
out=${OUT:-/tmp/engine-gpu1}
mkdir -p "$out"
. benchmarks/device_env.sh
t0=$SECONDS
ran=()
step() {  # name, timeout, command...: stdout -> $out/name.jsonl, stderr -> $out/name.err
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"
  echo "$name rc=$? t=$((SECONDS - t0))"
  ran+=("$name")
}
floor="benchmarks/latency_floor.py --device cuda --model llama-1b-shape --prompt-tokens 2048 --max-tokens 16
  --requests 20 --warmup 4 --num-cpus 16"
case $part in
  decode)
    # the first Triton compiles on a fresh machine take most of the check's time (170 s was short)
    step split_check 150 python3 benchmarks/split_decode_check.py
    step check 280 python3 benchmarks/gpu_check.py --only kernels,graphs,bf16-1b-fused
    step engine 150 python3 benchmarks/engine.py --device cuda --model llama-1b-shape --workloads decode_b1,batch \
      --scheduling async
    ;;
  prefill)
    step check_compiled 170 python3 benchmarks/gpu_check.py --only graphs,compiled-prefill
    step prefill 80 python3 benchmarks/profile_prefill.py --cases eager,compiled --num-prompts 8
    step floor_eager 110 python3 $floor --modes disaggregated --label eager
    # TORCH_LOGS=recompiles: a recompile inside a worker while serving shows in its log (.err)
    TORCH_LOGS=recompiles step floor_compiled 140 python3 $floor --modes disaggregated --label compiled \
      --set engine.compile_prefill=true
    echo "recompiles while serving: $(grep -c Recompiling "$out/floor_compiled.err")"
    # the KV READ per request (same GPU) + where its time goes (transfer_gpu.sh has the 2-GPU half)
    step transfer_requests 60 python3 benchmarks/transfer.py --device cuda --prefill-gpu 0 --decode-gpu 0 \
      --skip bandwidth,layerwise --profile-ipc
    ;;
  split)
    step split_check 200 python3 benchmarks/split_decode_check.py
    step profile_short 170 python3 benchmarks/profile_decode.py --batch-sizes 1,8,32 --prompt-len 128 \
      --decode-variants "kernel=general;kernel=split;kernel=split,chunk_keys=128;kernel=split,chunk_keys=512;kernel=split,chunk_keys=256,block_n=128"
    step profile_long 170 python3 benchmarks/profile_decode.py --batch-sizes 1,8,32 --prompt-len 2048 \
      --decode-variants "kernel=general;kernel=split;kernel=split,chunk_keys=128;kernel=split,chunk_keys=512;kernel=split,chunk_keys=256,block_n=128"
    ;;
  gemv_fault)
    # first: the compiled-prefill check (tokens, nothing compiled after the start-up warm-up, which
    # since the eleventh session includes one real request per engine)
    step check_compiled 130 python3 benchmarks/gpu_check.py --only compiled-prefill
    step engine_gemv 150 python3 benchmarks/engine.py --device cuda --model llama-1b-shape --workloads decode_b1,batch \
      --scheduling async --gemv
    step sanitizer $((560 - (SECONDS - t0))) /usr/local/cuda/bin/compute-sanitizer --tool memcheck --print-limit 8 \
      python3 benchmarks/engine.py --device cuda --model llama-1b-shape --workloads decode_b1,batch \
      --scheduling async --gemv
    grep -m 20 -E "Invalid|ERROR SUMMARY|at 0x|by thread|Address" "$out/sanitizer.err" "$out/sanitizer.jsonl"
    ;;
  attn32)
    # twelfth session: decode attention tiles the ninth session did not try (128/128 chunks, one
    # 256-key tile on 8 warps, warps, pipelining depth) at short and long contexts, batch 1/8/32
    v="kernel=split;kernel=split,chunk_keys=128,block_n=128;kernel=split,chunk_keys=256,block_n=256,warps=8"
    v="$v;kernel=split,warps=8;kernel=split,stages=3;kernel=split,stages=4"
    step attn_short 210 python3 benchmarks/profile_decode.py --batch-sizes 1,8,32 --prompt-len 128 --decode-variants "$v"
    step attn_long 210 python3 benchmarks/profile_decode.py --batch-sizes 1,8,32 --prompt-len 2048 --decode-variants "$v"
    ;;
  rope)
    # twelfth session: engine.rope_table (RoPE cos/sin from a table, not recomputed in every layer's
    # kernel): decode kernels at batch 1/32 and the 2048-token prefill step with and without it, the
    # correctness checks with it, then engine.py
    step decode_table 100 python3 benchmarks/profile_decode.py --batch-sizes 1,32
    step decode_notable 100 python3 benchmarks/profile_decode.py --batch-sizes 1,32 --no-rope-table
    step check 200 python3 benchmarks/gpu_check.py --only fp32-exact,compiled-prefill,bf16-1b-fused
    step engine 130 python3 benchmarks/engine.py --device cuda --model llama-1b-shape --workloads decode_b1,batch \
      --scheduling async
    left=$((560 - (SECONDS - t0)))
    if [ $left -gt 60 ]; then
      step prefill_table $((left / 2)) python3 benchmarks/profile_prefill.py --cases compiled --num-prompts 6
      step prefill_notable $((560 - (SECONDS - t0))) python3 benchmarks/profile_prefill.py --cases compiled \
        --num-prompts 6 --no-rope-table
    fi
    ;;
  gemv_cause)
    # twelfth session: the fault needs transformers' compiled generate in the process? engine.py
    # --gemv with generate's automatic torch.compile (CUDA graph trees) off, then with it on but
    # batch32 alone (no decode_b1 and its generate before)
    step engine_gemv_hf_eager 200 python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1,batch --scheduling async --gemv --hf-eager
    step engine_gemv_batch_only 200 python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads batch --scheduling async --gemv
    grep -h -m 3 -E "illegal|Error" "$out"/engine_gemv_*.err
    ;;
  r13)
    step decode_default 110 python3 benchmarks/profile_decode.py --batch-sizes 1,32
    step decode_autotune 200 python3 benchmarks/profile_decode.py --batch-sizes 1,32 --inductor max_autotune_gemm=1
    step transfer_same 90 python3 benchmarks/transfer.py --device cuda --prefill-gpu 0 --decode-gpu 0 \
      --skip request,layerwise --pipelined 8
    step check_bf16 150 python3 benchmarks/gpu_check.py --only bf16-1b-fused
    left=$((570 - (SECONDS - t0)))
    if [ $left -gt 60 ]; then
      step prefill_table $((left / 2)) python3 benchmarks/profile_prefill.py --cases compiled --num-prompts 6
      step prefill_notable $((570 - (SECONDS - t0))) python3 benchmarks/profile_prefill.py --cases compiled \
        --num-prompts 6 --no-rope-table
    fi
    ;;
  r13b)
    step transfer_diag 150 python3 benchmarks/transfer.py --device cuda --prefill-gpu 0 --decode-gpu 0 \
      --skip request,layerwise --pipelined 8 --profile-ipc --sizes-mib 16,32,64,128,256
    step decode_default 110 python3 benchmarks/profile_decode.py --batch-sizes 1,32
    step decode_cdt 200 python3 benchmarks/profile_decode.py --batch-sizes 1,32 --inductor coordinate_descent_tuning=1
    ;;
  r13c)
    step transfer_2d 120 python3 benchmarks/transfer.py --device cuda --prefill-gpu 0 --decode-gpu 0 \
      --skip layerwise --pipelined 8 --sizes-mib 16,32,64,128,256
    step engine 200 python3 benchmarks/engine.py --device cuda --model llama-1b-shape --workloads decode_b1,batch \
      --scheduling async
    step check $((560 - (SECONDS - t0))) python3 benchmarks/gpu_check.py --only graphs,fp32-exact,bf16-1b-fused,compiled-prefill
    ;;
  r13d)
    step b1_tuned 170 python3 benchmarks/profile_decode.py --batch-sizes 1 --tune-batch1
    step b1_untuned 150 python3 benchmarks/profile_decode.py --batch-sizes 1
    ;;
  r14)
    step tuned 200 python3 benchmarks/profile_decode.py --batch-sizes 1,32 --tune-batch1
    step untuned 110 python3 benchmarks/profile_decode.py --batch-sizes 1,32
    step check 200 python3 benchmarks/gpu_check.py --only sampler,graphs,fp32-exact,bf16-1b-fused --tune-batch1
    step engine $((570 - (SECONDS - t0))) python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1,batch --scheduling async --tune-batch1
    ;;
  fused_a)
    # engine.fused_decode (seventeenth session): CUDA checks with it on (4 families fp32 token-exact
    # vs generate, decode graphs == eager), then the decode graphs with and without it
    step check_fused 200 python3 benchmarks/gpu_check.py --only fp32-exact,graphs --fused-decode 2
    step prof_fused 200 python3 benchmarks/profile_decode.py --batch-sizes 1,2,4,32 --fused-decode 4
    step prof_base $((570 - (SECONDS - t0))) python3 benchmarks/profile_decode.py --batch-sizes 1,2,4,32 --no-fused-decode
    ;;
  fused_c)
    step check_fused2 200 python3 benchmarks/gpu_check.py --only fp32-exact,graphs,bf16-1b-fused --fused-decode 2
    step prof_fused2 200 python3 benchmarks/profile_decode.py --batch-sizes 1,2 --fused-decode 2
    step engine_fused2 $((570 - (SECONDS - t0))) python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1 --scheduling async --fused-decode 1
    ;;
  fused_d)
    step check_fused3 330 python3 benchmarks/gpu_check.py --only fp32-exact,graphs,bf16-1b-fused --fused-decode 2
    step tiles_fused $((560 - (SECONDS - t0))) python3 benchmarks/profile_decode.py --batch-sizes 1 --fused-decode 1 \
      --fused-tiles ";small_k=4x8;small_k=4x4,large_k=2x8;lm_head=8x8;lm_head=8x4,small_k=1x4;large_k=1x4;small_k=8x8,large_k=2x8,lm_head=8x8"
    ;;
  fused_e)
    # the defaults as committed (engine.fused_decode: auto, batch 1): bf16 1B check, engine.py
    step bf16_default 200 python3 benchmarks/gpu_check.py --only bf16-1b-fused
    step engine_default $((560 - (SECONDS - t0))) python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1,batch --scheduling async
    ;;
  preload)
    # (nineteenth session) the split decode kernel loading its first tile's cached K/V before the
    # PDL wait (TritonPagedAttention.decode_preload): decode graphs at batch 1 (fused, PDL), 8 and
    # 32 (modules), then the kernels check with it (every other split variant, bit-identity across
    # preload / PDL on and off)
    step preload 240 python3 benchmarks/profile_decode.py --batch-sizes 1,8,32 \
      --decode-variants "kernel=split;kernel=split,preload=1;kernel=split,preload=1,prefetch=1;kernel=split,preload=1,block_n=64"
    step check_preload $((560 - (SECONDS - t0))) python3 benchmarks/gpu_check.py --only kernels
    ;;
  preload2)
    # (next session) with the first tile loaded before the PDL wait, chunkings that put a whole
    # ~240-key context in preloaded tiles: 128-key chunks (two programs a KV head, merged by the
    # last) and one 256-key tile on 8 warps; batch 1, 8, 32 (a chunking fixes the bits, so it must
    # win across batches to become the default), then engine.py with the defaults
    step preload2 300 python3 benchmarks/profile_decode.py --batch-sizes 1,8,32 \
      --decode-variants "kernel=split;kernel=split,chunk_keys=128,block_n=128;kernel=split,block_n=256,warps=8;kernel=split,block_n=256,warps=8,stages=1"
    step engine_preload $((560 - (SECONDS - t0))) python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1,batch --scheduling async
    ;;
  argmax)
    # the decode graphs' own argmax (in-graph, greedy rows take it) checked against torch's, then
    # where the host's time goes per step (bare timers around each phase), the async step's device
    # timeline and engine.py's decode_b1 / batch32
    step check_argmax 200 python3 benchmarks/gpu_check.py --only argmax,graphs,bf16-1b-fused
    step host 150 python3 benchmarks/host_profile.py --batch-sizes 1,32
    step timeline 150 python3 benchmarks/profile_decode.py --batch-sizes 1,32 --timeline
    step engine $((580 - (SECONDS - t0))) python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1,batch --scheduling async
    ;;
  host2)
    # what the host's CUDA calls cost there (idle vs busy device) and its Python speed; the graphs'
    # argmax check again (fixed: each graph replayed before its outputs are compared); host phases
    # with the sampled tokens' pinned buffers reused (PinnedSlots); engine.py
    step api 90 python3 benchmarks/cuda_api_cost.py
    step check_graphs 200 python3 benchmarks/gpu_check.py --only argmax,graphs
    step host 150 python3 benchmarks/host_profile.py --batch-sizes 1,32
    step engine $((580 - (SECONDS - t0))) python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1,batch --scheduling async
    ;;
  blas)
    # batch 8 / 32 decode graphs are cuBLAS's GEMMs (q|k|v + o at ~1.5 TB/s): the same graphs with
    # cuBLASLt preferred, a 64 MiB workspace, and TunableOp tuning the GEMMs before capture (twentieth
    # session: the same kernels at the same times in all four; torch names the table tunableop0.csv)
    prof="benchmarks/profile_decode.py --batch-sizes 8,32"
    step blas_default 150 python3 $prof
    TORCH_BLAS_PREFER_CUBLASLT=1 step blas_lt 120 python3 $prof
    CUBLAS_WORKSPACE_CONFIG=:65536:2 CUBLASLT_WORKSPACE_SIZE=65536 step blas_ws 120 python3 $prof
    PYTORCH_TUNABLEOP_ENABLED=1 PYTORCH_TUNABLEOP_TUNING=1 PYTORCH_TUNABLEOP_FILENAME=$out/tunableop.csv \
      step blas_tunable $((560 - (SECONDS - t0))) python3 $prof
    ;;
  lt)
    # (twenty-first session, measured: none wins) cuBLASLt's own candidates for the decode projections at 8 and 32 rows vs
    # F.linear (ctypes; torch 2.11's TunableOp offers only the default on CUDA); then batch 1
    step lt 400 python3 benchmarks/cublaslt_probe.py --rows 8,32
    step lt1 $((560 - (SECONDS - t0))) python3 benchmarks/cublaslt_probe.py --rows 1
    ;;
  families)
    # (twenty-first session) the ten further families of tests/tiny_models.py on the CUDA path
    # (Triton attention, decode graphs, once more compiled) token-identical to generate; then the
    # kernels check, now with Phi-3-mini's (96) and Gemma's (256, windowed) head dims
    step families 400 python3 benchmarks/gpu_check.py --only more-families
    step kernels $((570 - (SECONDS - t0))) python3 benchmarks/gpu_check.py --only kernels
    ;;
  families2)
    # the same after the first call stopped at mixtral's graph capture (engine.cuda_graphs auto
    # since): the families it did not reach first, then the ones it passed, with compile_prefill too
    step families_b 330 python3 benchmarks/gpu_check.py --only more-families --families mixtral,qwen3_moe,phi,gpt2,smollm3
    step families_a $((570 - (SECONDS - t0))) python3 benchmarks/gpu_check.py --only more-families \
      --families phi3,gemma,gemma3_text,granite,olmo2
    ;;
  capped)
    # Gemma 2's attention logit cap through the Triton kernels: against the torch backend, then
    # generate (twenty-second session: passed; the engine's refusal of that path removed since)
    step capped_triton 560 python3 benchmarks/gpu_check.py --only capped-triton
    ;;
  sinks)
    # the kernels check with gpt-oss's attention sinks (two cases, one a 300-key context in two
    # chunks whose merge adds the sinks once); passed on an H200 in 275 s (twenty-third session)
    step kernels 560 python3 benchmarks/gpu_check.py --only kernels
    ;;
  r23)
    # the defaults re-checked after the twenty-third session's loader change (quantized checkpoints),
    # then engine.py's decode_b1 / batch32 on that host
    step check_r23 280 python3 benchmarks/gpu_check.py --only graphs,fp32-exact,bf16-1b-fused
    step engine $((580 - (SECONDS - t0))) python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1,batch --scheduling async
    ;;
  r23b)
    # r23's check ran out of its 280 s on a fresh machine (after fp32-exact): the rest, with room
    step check_r23b 560 python3 benchmarks/gpu_check.py --only graphs,bf16-1b-fused
    ;;
  mxfp4)
    # gpt-oss as released: MXFP4 experts dequantized at load (bf16 / fp32 weights, fp32 tokens vs
    # generate); passed on an H200 in 86 s (twenty-third session, after the bf16 -> dtype cast)
    step mxfp4 300 python3 benchmarks/gpu_check.py --only mxfp4
    ;;
  moe)
    # mixture-of-experts in bf16 (as served): each variant against the fp32 model (twenty-second
    # session's rule), then compiled vs not (benchmarks/moe_compile_probe.py --only engine_speed)
    step moe 300 python3 benchmarks/gpu_check.py --only moe-bf16
    step moe_speed $((560 - (SECONDS - t0))) python3 benchmarks/moe_compile_probe.py --only engine_speed
    ;;
  fused_b)
    step bf16_fused 200 python3 benchmarks/gpu_check.py --only bf16-1b-fused --fused-decode 1
    step engine_fused $((570 - (SECONDS - t0))) python3 benchmarks/engine.py --device cuda --model llama-1b-shape \
      --workloads decode_b1,batch --scheduling async --fused-decode 1
    ;;
  gemv)
    step host 120 python3 benchmarks/host_profile.py --batch-sizes 1,32
    step check_gemv 150 python3 benchmarks/gpu_check.py --only gemv,bf16-1b-gemv
    step engine_gemv 130 python3 benchmarks/engine.py --device cuda --model llama-1b-shape --workloads decode_b1,batch \
      --scheduling async --gemv
    step engine 110 python3 benchmarks/engine.py --device cuda --model llama-1b-shape --workloads decode_b1,batch \
      --scheduling async
    ;;
esac
for f in "${ran[@]}"; do
  echo "== $f"
  grep -h '^{' "$out/$f.jsonl" | cut -c1-1500
  grep -q '^{' "$out/$f.jsonl" || tail -5 "$out/$f.err"
done
