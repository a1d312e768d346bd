"""Layer-wise KV streaming vs whole-request READ with the real engine: time to first token on the
decode side. Prints one JSON line per prompt length (both modes measured in the same run,
interleaved).

    python benchmarks/layerwise.py --model small-shape --tokens 512,2048 --iters 3

Two processes (spawn), each an Engine (random-weight model of a real shape, fp32 on CPU) with a
NixlTransceiver, talking over a pipe (the workers' Ray calls, without Ray):
  whole      decode sends the prompt; prefill runs it (prefill_only) and answers the handle;
             decode reserves, READs every block (one NIXL READ), tells prefill to release, commits
  layerwise  decode reserves and expects layers, sends the prompt with its LayerwiseTarget;
             prefill runs it with the engine's per-layer hook WRITing each layer of the final
             chunk (and the layers of earlier chunks' blocks) as it is computed, finishes the
             sender, frees its blocks and answers; decode waits for every layer and the answer,
             commits
TTFT = decode side, from sending the request to commit_import returning the first token; then
the decode engine produces 3 more tokens, and outputs_equal says both modes produced the same ones
(on a GPU the whole-request READ takes the CUDA IPC path: transfer.cuda_ipc auto). Every request
has its own cache salt (no prefix-cache hits on either side).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("UCX_NET_DEVICES", "lo")


def _side(name: str, args):
    import torch

    torch.set_num_threads(args.threads)
    from prometheus_client import CollectorRegistry

    from benchmarks.engine import build_model
    from kv_transfer.metrics import TransferMetrics
    from kv_transfer.nixl_transceiver import NixlTransceiver
    from workers.engine.config import EngineConfig, ModelConfig
    from workers.engine.engine import Engine

    model_dir = build_model(args.model, Path(args.cache))
    max_tokens = max(args.tokens)
    cfg = EngineConfig(block_size=16, num_kv_blocks=2 * (-(-max_tokens // 16)) + 64, blocks_per_segment=64,
                       max_num_batched_tokens=args.chunk, max_num_seqs=4, max_model_len=max_tokens + 64,
                       cuda_graphs=False, compile_decode=False)  # prefill steps only: no decode graphs
    engine = Engine(ModelConfig(device=args.device, dtype=args.dtype), cfg, model_dir, worker_id=name)
    tx = NixlTransceiver(name, engine.kv_cache, metrics=TransferMetrics(name, "nixl", CollectorRegistry()))
    return engine, tx


def _prefill_main(conn, args) -> None:
    from workers.protocol import SamplingParams

    engine, tx = _side("prefill", args)
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    conn.send(tx.peer_info())

    def run(rid, prompt, salt, factory=None):
        engine.add_request(rid, prompt, first, salt, prefill_only=True, on_layer_done=factory)
        while True:
            out = engine.step()
            if out.handles:
                return out.handles[0]

    while True:
        cmd, payload = conn.recv()
        if cmd == "close":
            tx.close()
            conn.send(None)
            return
        if cmd == "add_peer":
            tx.add_peer(payload)
            conn.send(None)
        elif cmd == "whole":
            rid, prompt, salt = payload
            start = time.perf_counter()
            handle = run(rid, prompt, salt)
            conn.send((handle, time.perf_counter() - start))
        elif cmd == "release":
            engine.release_handle(payload)
            conn.send(None)
        elif cmd == "layerwise":
            rid, prompt, salt, target = payload
            senders = []

            def factory(block_ids, target=target):
                senders.append(tx.layerwise_sender(target, block_ids[target.first_block_index:], 60.0))
                return senders[-1].layer_done

            start = time.perf_counter()
            handle = run(rid, prompt, salt, factory)
            computed = time.perf_counter() - start
            senders[0].finish()
            engine.release_handle(rid)
            conn.send((handle, computed))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small-shape", help="benchmarks/engine.py shape, 'tiny' or a directory")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    parser.add_argument("--chunk", type=int, default=512, help="engine.max_num_batched_tokens (chunked prefill)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--cache", default=str(REPO / ".cache" / "bench-models"))
    args = parser.parse_args(argv)

    from workers.protocol import LayerwiseTarget, SamplingParams

    ctx = mp.get_context("spawn")
    pipe, there = ctx.Pipe()
    child = ctx.Process(target=_prefill_main, args=(there, args), daemon=True)
    child.start()

    class Here:  # the pipe, but a dead prefill process is an error, not a hang
        send = pipe.send

        @staticmethod
        def recv():
            while not pipe.poll(0.5):
                if not child.is_alive():
                    raise RuntimeError(f"the prefill process died (exit code {child.exitcode})")
            return pipe.recv()

    here = Here()
    prefill_info = here.recv()
    engine, tx = _side("decode", args)
    tx.add_peer(prefill_info)
    here.send(("add_peer", tx.peer_info()))
    here.recv()
    sampling = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    lay = engine.layout

    def whole(prompt):
        rid, salt = f"w-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        start = time.perf_counter()
        here.send(("whole", (rid, prompt, salt)))
        handle, computed = here.recv()
        res = engine.reserve_import(rid, prompt, sampling, salt)
        read_start = time.perf_counter()
        tx.read_blocking("prefill", list(handle.block_ids), list(res.block_ids), 60.0, num_tokens=len(prompt))
        read_s = time.perf_counter() - read_start
        here.send(("release", rid))
        here.recv()
        engine.commit_import(rid, handle.first_token_id)
        ttft = time.perf_counter() - start
        return ttft, computed, read_s, [handle.first_token_id] + decode_rest(rid)

    def layerwise(prompt):
        rid, salt = f"l-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        start = time.perf_counter()
        res = engine.reserve_import(rid, prompt, sampling, salt)
        tx.expect_layers(rid)
        target = LayerwiseTarget(rid, "decode", res.block_ids, engine.kv_cache.epoch, tx.compat_hash)
        here.send(("layerwise", (rid, prompt, salt, target)))
        received = tx.receive_layers_blocking(rid, 60.0, len(res.block_ids))
        handle, computed = here.recv()
        engine.commit_import(rid, handle.first_token_id)
        ttft = time.perf_counter() - start
        last_layer_wait = time.time() - received.layer_times[-1]  # after the last layer arrived
        return ttft, computed, last_layer_wait, [handle.first_token_id] + decode_rest(rid)

    def decode_rest(rid):
        """The request's remaining tokens: they depend on the transferred KV, so equal outputs
        of the two modes check both transfers end to end."""
        tokens = []
        while engine.has_work():
            tokens += [t for d in engine.step().deltas if d.request_id == rid for t in d.token_ids]
        return tokens

    try:
        import torch

        print(json.dumps({"bench": "env", "model": args.model, "device": args.device, "dtype": args.dtype,
                          "num_layers": lay.num_layers, "kv_heads": lay.num_kv_heads, "head_dim": lay.head_dim,
                          "chunk_tokens": args.chunk, "torch_threads": args.threads, "cpus": os.cpu_count(),
                          "torch": torch.__version__}), flush=True)
        for tokens in args.tokens:
            prompt = [(i * 7919) % (engine.vocab_size - 3) + 3 for i in range(tokens)]
            rows = {"whole": [], "layerwise": []}
            outputs_equal = True
            for i in range(args.warmup + args.iters):
                w, lw = whole(prompt), layerwise(prompt)
                outputs_equal = outputs_equal and w[3] == lw[3]
                if i >= args.warmup:
                    rows["whole"].append(w)
                    rows["layerwise"].append(lw)
            med = {k: [statistics.median(r[j] for r in v) for j in range(3)] for k, v in rows.items()}
            kv_bytes = -(-tokens // lay.block_size) * lay.bytes_per_block_all_layers
            print(json.dumps({
                "bench": "layerwise_ttft", "model": args.model, "device": args.device, "tokens": tokens,
                "kv_bytes": kv_bytes, "num_layers": lay.num_layers, "iters": args.iters,
                "ttft_whole_ms": round(med["whole"][0] * 1e3, 2), "ttft_layerwise_ms": round(med["layerwise"][0] * 1e3, 2),
                "gain_ms": round((med["whole"][0] - med["layerwise"][0]) * 1e3, 2),
                "gain_pct": round(100 * (1 - med["layerwise"][0] / med["whole"][0]), 2),
                "prefill_compute_whole_ms": round(med["whole"][1] * 1e3, 2),
                "prefill_compute_layerwise_ms": round(med["layerwise"][1] * 1e3, 2),
                "whole_read_ms": round(med["whole"][2] * 1e3, 2),
                "layerwise_after_last_layer_ms": round(med["layerwise"][2] * 1e3, 2),
                "whole_read_path": tx.transport_info()["read_paths"], "outputs_equal": outputs_equal}), flush=True)
    finally:
        if child.is_alive():
            here.send(("close", None))
            here.recv()
        child.join(timeout=30)
        tx.close()


if __name__ == "__main__":
    main()
