"""How fast can one process copy another process's VRAM it has mapped through CUDA IPC? (issue 8)

    python3 benchmarks/ipc_copy.py [--owner-gpu 0] [--reader-gpu 0] [--sizes-mib 1,16,64,256]

An owner process allocates a uint8 tensor and shares it (torch.multiprocessing: the same
cudaIpcGetMemHandle / _share_cuda_ handles the transceiver exports); the reader maps it and copies
it into its own tensor several ways, each timed on its own (median of --iters after 3 warm-ups,
wall time around launch + stream synchronize, as CudaIpcReader.read does):

    memcpy_local   dst.copy_(src) between two of the reader's own tensors  (the baseline)
    memcpy_mapped  dst.copy_(mapped)         cudaMemcpyAsync, what copy_runs does for few slices
    sm_mapped      a Triton kernel loading the mapped pointer (SM copy, int4-wide)
    rows_mapped    the same kernel over 16 KiB rows in random order (scattered blocks, one pass)
    gather_mapped  index_select + index_copy_ (copy_runs' path for many slices)

--register owner|reader|both registers the owner's tensor and/or the reader's destination with a
NIXL agent (UCX backend), as the transceivers do with their KV segments, before timing.

Prints one JSON line per (size, method) with GB/s (bytes / time) and the ratio to memcpy_local,
then one line with the kernels a profiled memcpy_mapped and sm_mapped launched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cuda_kernels import kernel_times  # noqa: E402

ROW_BYTES = 16384  # one Llama-3.2-1B-shaped KV block of one layer's K (16 tokens x 8 heads x 64 x bf16)


@triton.jit
def _copy_rows(src, dst, s_rows, d_rows, row_words: tl.constexpr, BLOCK: tl.constexpr):
    """dst row d_rows[i] = src row s_rows[i]; rows of row_words int64 words; grid (rows, chunks)."""
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(s_rows + i).to(tl.int64) * row_words
    d = tl.load(d_rows + i).to(tl.int64) * row_words
    offs = c * BLOCK + tl.arange(0, BLOCK)
    if row_words % BLOCK == 0:  # whole tiles: no mask, 16-byte vector loads
        s = tl.multiple_of(s, 2)
        d = tl.multiple_of(d, 2)
        tl.store(dst + d + offs, tl.load(src + s + offs))
    else:
        mask = offs < row_words
        tl.store(dst + d + offs, tl.load(src + s + offs, mask=mask), mask=mask)


def copy_rows(src: torch.Tensor, dst: torch.Tensor, s_rows: torch.Tensor, d_rows: torch.Tensor, row_bytes: int,
              block: int = 4096, warps: int = 8):
    words = row_bytes // 8
    block = min(block, triton.next_power_of_2(words))
    grid = (s_rows.numel(), triton.cdiv(words, block))
    _copy_rows[grid](src.view(torch.int64), dst.view(torch.int64), s_rows, d_rows, words, block, num_warps=warps)


def llama_request(mapped: torch.Tensor, dst: torch.Tensor, dev) -> dict:
    """A 2048-token request of a Llama-3.2-1B-shaped KV (16 layers x K/V, 16 KiB per block and
    (layer, kv), 256 blocks per segment): 128 consecutive blocks from local block 64 of the
    owner's segment into local block 100 of ours: 32 slices of 2 MiB, 4 MiB apart (64 MiB)."""
    slices, bps, bb, count = 32, 256, ROW_BYTES, 128
    seg = slices * bps * bb  # 128 MiB
    src, out = mapped[:seg], dst[:seg]
    s0, d0 = 64, 100
    s2 = src.view(torch.int64).view(slices, bps * bb // 8)[:, s0 * bb // 8:(s0 + count) * bb // 8]
    d2 = out.view(torch.int64).view(slices, bps * bb // 8)[:, d0 * bb // 8:(d0 + count) * bb // 8]
    lkv = torch.arange(slices, device=dev, dtype=torch.int32)[:, None] * bps
    s_rows = (lkv + s0 + torch.arange(count, device=dev, dtype=torch.int32)[None]).reshape(-1)
    d_rows = (lkv + d0 + torch.arange(count, device=dev, dtype=torch.int32)[None]).reshape(-1)

    def per_slice():
        for i in range(slices):
            a, b = (i * bps + s0) * bb, (i * bps + d0) * bb
            out[b:b + count * bb].copy_(src[a:a + count * bb], non_blocking=True)

    def gather_scatter():
        rows_s, rows_d = src.view(torch.int64).view(-1, bb // 8), out.view(torch.int64).view(-1, bb // 8)
        rows_d.index_copy_(0, d_rows.long(), rows_s.index_select(0, s_rows.long()))

    def check(fn) -> bool:
        d2.zero_()
        fn()
        torch.cuda.synchronize()
        return bool(torch.equal(d2, s2))

    check.__name__ = "check"
    return check, {"req_per_slice_copy": per_slice, "req_strided_copy": lambda: d2.copy_(s2, non_blocking=True),
            "req_triton_rows": lambda: copy_rows(src, out, s_rows, d_rows, bb),
            "req_triton_rows_w4": lambda: copy_rows(src, out, s_rows, d_rows, bb, 2048, 4),
            "req_triton_rows_b1k": lambda: copy_rows(src, out, s_rows, d_rows, bb, 1024, 4),
            "req_gather_scatter": gather_scatter,
            "req_local_memcpy_64mib": lambda: out[seg // 2:].copy_(dst[-(seg // 2):] if dst.numel() >= 2 * seg
                                                                     else out[:seg // 2], non_blocking=True)}


def _register(name: str, tensor: torch.Tensor):
    """A NIXL agent (UCX) with ``tensor`` registered, as NixlTransceiver registers KV segments."""
    from kv_transfer.nixl_agent import load_nixl, start_agent

    api = load_nixl()
    config = api.nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False, backends=[],
                                   sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    agent = start_agent(api, name, config, 100)
    agent.create_backend("UCX", {})
    return agent, agent.register_memory(tensor)


def _owner(gpu: int, nbytes: int, q_out, q_in, register: bool) -> None:
    torch.cuda.set_device(gpu)
    t = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=f"cuda:{gpu}")
    torch.cuda.synchronize()
    _keep = _register("ipc-copy-owner", t) if register else None  # alive until we return
    q_out.put(t)
    q_in.get()  # keep the memory alive until the reader is done


def _timed(fn, stream: torch.cuda.Stream, iters: int) -> float:
    for _ in range(3):
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _kernels(fn, stream) -> list[str]:
    """The names of the device kernels fn launches on ``stream``."""
    def on_stream():
        with torch.cuda.stream(stream):
            fn()

    return sorted(name for name, _ in kernel_times(on_stream, top=50)[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--owner-gpu", type=int, default=0)
    p.add_argument("--reader-gpu", type=int, default=0)
    p.add_argument("--sizes-mib", default="1,16,64,256")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--register", choices=["none", "owner", "reader", "both"], default="none")
    args = p.parse_args()
    sizes = [int(s) << 20 for s in args.sizes_mib.split(",")]
    ctx = mp.get_context("spawn")
    q_out, q_in = ctx.Queue(), ctx.Queue()
    owner = ctx.Process(target=_owner, args=(args.owner_gpu, max(sizes), q_out, q_in,
                                                     args.register in ("owner", "both")), daemon=True)
    owner.start()
    torch.cuda.set_device(args.reader_gpu)
    dev = torch.device("cuda", args.reader_gpu)
    mapped = q_out.get(timeout=120)
    stream = torch.cuda.Stream(dev)
    local_src = mapped.to(dev)  # same bytes, our own memory
    dst = torch.empty(max(sizes), dtype=torch.uint8, device=dev)
    _keep = _register("ipc-copy-reader", dst) if args.register in ("reader", "both") else None
    gen = torch.Generator().manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(dev), "owner_gpu": args.owner_gpu, "reader_gpu": args.reader_gpu,
            "mapped_device": str(mapped.device), "torch": torch.__version__,
            "register": args.register}
    print(json.dumps({"bench": "ipc_copy_meta", **meta}), flush=True)
    for size in sizes:
        rows = size // ROW_BYTES
        perm_s = torch.randperm(rows, generator=gen).to(dev, torch.int32)
        perm_d = torch.randperm(rows, generator=gen).to(dev, torch.int32)
        seq = torch.arange(rows, device=dev, dtype=torch.int32)
        m, d, lo = mapped[:size], dst[:size], local_src[:size]
        m_rows, d_rows = m.view(torch.int64).view(rows, -1), d.view(torch.int64).view(rows, -1)
        methods = {
            "memcpy_local": lambda: d.copy_(lo, non_blocking=True),
            "memcpy_mapped": lambda: d.copy_(m, non_blocking=True),
            "sm_mapped": lambda: copy_rows(m, d, seq, seq, ROW_BYTES),
            "sm_local": lambda: copy_rows(lo, d, seq, seq, ROW_BYTES),
            "rows_mapped": lambda: copy_rows(m, d, perm_s, perm_d, ROW_BYTES),
            "gather_mapped": lambda: d_rows.index_copy_(0, perm_d.long(), m_rows.index_select(0, perm_s.long())),
        }
        base = None
        for name, fn in methods.items():
            t = _timed(fn, stream, args.iters)
            base = base or t
            ok = True
            if name in ("memcpy_mapped", "sm_mapped"):
                torch.cuda.synchronize()
                ok = bool(torch.equal(d, lo))
            print(json.dumps({"bench": "ipc_copy", "register": args.register, "size_mib": size >> 20, "method": name, "ms": round(t * 1e3, 4),
                              "GBps": round(size / t / 1e9, 1), "ratio_vs_memcpy_local": round(base / t, 3),
                              "bytes_match": ok}), flush=True)
    if mapped.numel() >= 128 << 20:
        check, methods = llama_request(mapped, dst, dev)
        for name, fn in methods.items():
            t = _timed(fn, stream, args.iters)
            ok = None if "local" in name else check(fn)
            print(json.dumps({"bench": "ipc_copy_request", "method": name, "ms": round(t * 1e3, 4),
                              "GBps": round((64 << 20) / t / 1e9, 1), "bytes_match": ok}), flush=True)
    m = mapped[:64 << 20]
    d = dst[:64 << 20]
    seq = torch.arange((64 << 20) // ROW_BYTES, device=dev, dtype=torch.int32)
    print(json.dumps({"bench": "ipc_copy_kernels",
                      "memcpy_mapped": _kernels(lambda: d.copy_(m, non_blocking=True), stream),
                      "memcpy_local": _kernels(lambda: d.copy_(local_src[:64 << 20], non_blocking=True), stream),
                      "sm_mapped": _kernels(lambda: copy_rows(m, d, seq, seq, ROW_BYTES), stream)}), flush=True)
    # the fixed cost of one read's bookkeeping: stream context + synchronize with nothing to do
    empty = _timed(lambda: None, stream, 200)
    print(json.dumps({"bench": "ipc_copy_overhead", "empty_stream_sync_us": round(empty * 1e6, 1)}), flush=True)
    q_in.put(None)
    owner.join(timeout=30)


if __name__ == "__main__":
    main()
