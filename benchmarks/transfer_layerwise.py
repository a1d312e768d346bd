"""benchmarks/transfer.py's layer-wise bench: a 2048-token Llama-3.2-1B-shaped request whose
prefill computes its layers ``layer_ms`` apart, READ whole after the last layer vs streamed layer by
layer (WRITEs as each layer is done), decode-side wall time from the prefill's start.
"""

from __future__ import annotations

import statistics
import time
import uuid


def bench_layerwise(side, conn, args, emit) -> None:
    from workers.protocol import LayerwiseTarget

    tx, lay = side.tx["llama"], side.layouts["llama"]
    conn.send(("add_peer", tx.peer_info()))
    conn.recv()
    tokens = 2048
    ids = list(range(-(-tokens // lay.block_size)))
    for layer_ms in args.layer_ms:
        whole, streamed = [], []
        for i in range(args.warmup + args.iters):
            start = time.perf_counter()
            conn.send(("compute", (layer_ms, lay.num_layers)))
            conn.recv()
            tx.read_blocking("prefill-llama", ids, ids, 60.0)
            t_whole = time.perf_counter() - start

            rid = f"lw-{uuid.uuid4().hex[:8]}"
            tx.expect_layers(rid)
            target = LayerwiseTarget(rid, "decode-llama", tuple(ids), side.caches["llama"].epoch, tx.compat_hash)
            start = time.perf_counter()
            conn.send(("layerwise", (target, ids, layer_ms)))
            tx.receive_layers_blocking(rid, 60.0, len(ids))
            t_stream = time.perf_counter() - start
            conn.recv()
            if i >= args.warmup:
                whole.append(t_whole)
                streamed.append(t_stream)
        w, s = statistics.median(whole), statistics.median(streamed)
        compute = lay.num_layers * layer_ms / 1e3
        emit({"bench": "layerwise", "device": args.device, "layout": lay.model_id, "dtype": lay.dtype,
              "tokens": tokens, "num_layers": lay.num_layers, "layer_ms": layer_ms,
              "compute_ms": round(compute * 1e3, 3), "whole_request_ms": round(w * 1e3, 3),
              "layerwise_ms": round(s * 1e3, 3), "gain_ms": round((w - s) * 1e3, 3),
              "transfer_after_compute_whole_ms": round((w - compute) * 1e3, 3),
              "transfer_after_compute_layerwise_ms": round((s - compute) * 1e3, 3)})
