#!/usr/bin/env bash
# The GPU half of the KV-transfer benchmarks (issue 8), as run in one call on a 2-GPU machine
# (nvidia-h100-x2): CUDA IPC vs NIXL vs torch copies, same GPU across processes and GPU0 -> GPU1,
# then layer-wise vs whole-request TTFT with the real engine. Writes JSON lines under $OUT and
# prints a short summary last. Needs nixl + pydantic on PYTHONPATH (a slim site-packages tar:
# benchmarks/README.md says how it was made) at .kvipc/site.tar.xz.
set -uo pipefail
out=${OUT:-/tmp/kv-gpu-out}
mkdir -p "$out" /tmp/site
tar xJf .kvipc/site.tar.xz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 UCX_NET_DEVICES=lo
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ nvidia-smi topo -m; python3 -c "
import torch
n = torch.cuda.device_count()
print('gpus', n, [torch.cuda.get_device_name(i) for i in range(n)], 'torch', torch.__version__)
print('peer access', {(a, b): torch.cuda.can_device_access_peer(a, b) for a in range(n) for b in range(n) if a != b})"
} > "$out/topo.txt" 2>&1
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout 110 python3 benchmarks/transfer.py --device cuda --prefill-gpu 0 --decode-gpu 0 --skip layerwise \
  > "$out/same_gpu.jsonl" 2> "$out/same_gpu.err"
if [ "$ngpu" -ge 2 ]; then
  timeout 110 python3 benchmarks/transfer.py --device cuda --prefill-gpu 0 --decode-gpu 1 --skip layerwise \
    > "$out/cross_gpu.jsonl" 2> "$out/cross_gpu.err"
fi
timeout 120 python3 benchmarks/layerwise.py --device cuda --dtype bfloat16 --model small-shape \
  --tokens 2048,8192 --chunk 2048 --iters 5 --cache /tmp/bench-models \
  > "$out/layerwise_gpu.jsonl" 2> "$out/layerwise_gpu.err"
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("same_gpu", "cross_gpu", "layerwise_gpu"):
    path = out / f"{name}.jsonl"
    if not path.exists():
        continue
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")]
    keep = []
    for r in rows:
        if r.get("bench") == "bandwidth":
            keep.append({k: r.get(k) for k in ("size_bytes", "nixl_GBps", "ipc_GBps", "memcpy_GBps", "memcpy_peer_GBps",
                                                "ipc_ratio_vs_memcpy", "ipc_ratio_vs_memcpy_peer", "ipc_bytes_match",
                                                "ipc_error") if r.get(k) is not None})
        elif r.get("bench") == "request":
            keep.append({k: r.get(k) for k in ("path", "tokens", "blocks", "transfer_ms", "bytes_match", "error")
                         if r.get(k) is not None})
        elif r.get("bench") in ("layerwise_ttft", "ipc_paths"):
            keep.append(r)
    print(json.dumps({name: keep}, separators=(",", ":")))
PY
