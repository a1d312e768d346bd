#!/usr/bin/env bash
# The GPU half of the KV-transfer benchmarks (issue 8), one call on a 2-GPU machine (nvidia-h100-x2),
# ~4-6 minutes (each step has a timeout; the before steps are skipped past 400 s): CUDA IPC READs vs torch copies of the same bytes, same GPU across processes and
# GPU0 -> GPU1 (benchmarks/transfer.py --device cuda):
#   selfcheck         the reader's stream switch and every copy path on the GPU, bytes checked
#   same_gpu          sync sweep 1-256 MiB (bench=bandwidth), per-request READs (bench=request),
#   cross_gpu           N=8 READs in flight vs 8 copies (bench=pipelined), --profile-ipc pieces
#   before_same_gpu   the sync sweep again with .kvbefore/kv_transfer (the code before this change,
#   before_cross_gpu    `git archive <rev> kv_transfer | tar x -C .kvbefore`), when it was carried
# Carry [".devbundle", ".kvbefore"]. Writes JSON lines and stderr.log under $OUT; prints each failed
# step's stderr tail as it goes, and a summary last.
set -uo pipefail
out=${OUT:-/tmp/kv-gpu-out}
mkdir -p "$out"
. benchmarks/device_env.sh
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
steps=()
step() {  # step NAME TIMEOUT_S CMD...: stdout -> $out/NAME.jsonl, stderr appended to $out/stderr.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name: $*" >> "$out/stderr.log"
  timeout "$limit" "$@" > "$out/$name.jsonl" 2> "$out/$name.err"
  rc=$?
  cat "$out/$name.err" >> "$out/stderr.log"
  steps+=("{\"step\":\"$name\",\"rc\":$rc,\"s\":$((SECONDS - start))}")
  if [ "$rc" -ne 0 ]; then
    echo "=== $name FAILED rc=$rc (124 = timed out) after $((SECONDS - start)) s; stderr tail:"
    tail -n 20 "$out/$name.err"
  fi
  rm -f "$out/$name.err"
}
{ nvidia-smi topo -m; python3 -c "
import torch
n = torch.cuda.device_count()
print('gpus', n, [torch.cuda.get_device_name(i) for i in range(n)], 'torch', torch.__version__)
print('peer access', {(a, b): torch.cuda.can_device_access_peer(a, b) for a in range(n) for b in range(n) if a != b})"
} >> "$out/stderr.log" 2>&1
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>> "$out/stderr.log")
ngpu=${ngpu:-0}
bench=(python3 benchmarks/transfer.py --device cuda --prefill-gpu 0)

step selfcheck 90 python3 - <<'PY'
import json, random, traceback
import torch
from kv_transfer import cuda_ipc
from kv_transfer.block_copy import SegmentSet, SegmentViews, copy_runs
from kv_transfer.descriptors import plan_runs
from kv_transfer.layout import KVLayout
from workers.engine.kv_cache import KVCache

def emit(check, ok, **kw):
    print(json.dumps({"check": check, "ok": bool(ok), **kw}), flush=True)

def guarded(check, fn, **kw):
    try:
        fn()
    except Exception as e:
        emit(check, False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-600:], **kw)

def stream_switch():  # the reader's C-level stream switch puts back the current device and streams
    n = torch.cuda.device_count()
    ours = torch.cuda.Stream(0)
    for first in range(n):
        torch.cuda.set_device(first)
        before = (torch.cuda.current_device(), [torch.cuda.current_stream(d) for d in range(n)])
        state = cuda_ipc._enter_streams(((ours.stream_id, ours.device_index, ours.device_type),))
        inside = (torch.cuda.current_device(), torch.cuda.current_stream(0))
        cuda_ipc._exit_streams(state)
        after = (torch.cuda.current_device(), [torch.cuda.current_stream(d) for d in range(n)])
        emit("stream_switch", before == after and inside == (0, ours), from_device=first)
    torch.cuda.set_device(0)

def views(cache):
    return SegmentSet({i: SegmentViews.of(t, cache.layout) for i, t in cache.segments.items()})

def copy_paths(name, heads, head_dim, block_size):
    base = dict(model_id="m", num_layers=4, num_kv_heads=heads, head_dim=head_dim, block_size=block_size,
                dtype="bfloat16")
    sl, dl = KVLayout(**base, blocks_per_segment=16), KVLayout(**base, blocks_per_segment=12)
    src, dst = KVCache(sl, 4, device="cuda:0"), KVCache(dl, 4, device="cuda:0")
    for t in src.segments.values():
        t.copy_(torch.randn(t.shape, device="cuda:0"))
    sample = lambda cap, k, seed: random.Random(seed).sample(range(cap), k)
    cases = {"scattered_4_segments": (sample(64, 40, 1), sample(48, 40, 2), {}),
             "scattered_torch": (sample(64, 40, 1), sample(48, 40, 2), dict(kernel=False)),
             "contiguous_over_segments": (list(range(5, 45)), list(range(3, 43)), {}),
             "contiguous_over_segments_torch": (list(range(5, 45)), list(range(3, 43)), dict(kernel=False)),
             "one_run": (list(range(2, 12)), list(range(1, 11)), {}),
             "source_range_into_scattered": (list(range(16, 28)), sample(12, 12, 3), dict(kernel=False, max_strided_runs=0)),
             "scattered_into_range": (sample(16, 12, 4), list(range(12, 24)), dict(kernel=False, max_strided_runs=0))}
    for case, (remote, local, kwargs) in cases.items():
        for seg in dst.segments.values():
            seg.zero_()
        copy_runs(views(src), views(dst), sl, dl, plan_runs(remote, local, 16, 12), **kwargs)
        torch.cuda.synchronize()
        others = [b for b in range(dst.num_blocks) if b not in set(local)]
        ok = torch.equal(dst.read_blocks(local), src.read_blocks(remote)) and not dst.read_blocks(others).any()
        emit("copy_path", ok, blocks=name, case=case)

guarded("stream_switch", stream_switch)
guarded("copy_path", lambda: copy_paths("16KiB", 8, 64, 16), blocks="16KiB")
guarded("copy_path", lambda: copy_paths("6B", 1, 3, 1), blocks="6B")
PY
step same_gpu 150 "${bench[@]}" --decode-gpu 0 --skip layerwise --pipelined 8 --profile-ipc
if [ "$ngpu" -ge 2 ]; then
  step cross_gpu 150 "${bench[@]}" --decode-gpu 1 --skip layerwise --pipelined 8 --profile-ipc
fi
if [ "$SECONDS" -gt 400 ]; then  # the call's 600 s must leave room for the summary
  steps+=("{\"step\":\"before\",\"skipped\":\"out of time at ${SECONDS} s\"}")
elif [ -d .kvbefore/kv_transfer ]; then
  step before_same_gpu 80 env PDSERVE_KV_TRANSFER_TREE="$PWD/.kvbefore" "${bench[@]}" --decode-gpu 0 \
    --skip request,layerwise
  if [ "$ngpu" -ge 2 ]; then
    step before_cross_gpu 80 env PDSERVE_KV_TRANSFER_TREE="$PWD/.kvbefore" "${bench[@]}" --decode-gpu 1 \
      --skip request,layerwise
  fi
else
  steps+=('{"step":"before","skipped":"no .kvbefore/kv_transfer carried"}')
fi
printf '%s\n' "${steps[@]}" > "$out/steps.jsonl"
python3 benchmarks/transfer_gpu_summary.py "$out" | tee "$out/summary.json"
