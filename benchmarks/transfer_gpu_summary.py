"""The short summary benchmarks/transfer_gpu.sh prints last: python3 transfer_gpu_summary.py OUT_DIR.

Reads the steps' JSON lines (selfcheck, same_gpu, cross_gpu, before_same_gpu, before_cross_gpu,
steps) and prints one JSON object: failed checks, per placement the sync sweep's IPC / copy ratio
(after, and before where that step ran), the pipelined ratios, per-request READ times, the
profile's pieces at 16 MiB and the largest size, and the copy paths' times. The baseline copy is a
local copy on the same GPU and a GPU0 -> GPU1 copy across GPUs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _ratio(row: dict, cross: bool, prefix: str = "ipc") -> float | None:
    return row.get(f"{prefix}_ratio_vs_memcpy_peer" if cross else f"{prefix}_ratio_vs_memcpy")


def summarize(out: Path) -> dict:
    checks = _rows(out / "selfcheck.jsonl")
    steps = _rows(out / "steps.jsonl")
    summary: dict = {"all_steps_ok": all(s.get("rc", 0) == 0 for s in steps),
                     "selfcheck": {"passed": sum(r["ok"] for r in checks),
                                   "failed": [r for r in checks if not r["ok"]]},
                     "steps": steps}
    for placement, cross in (("same_gpu", False), ("cross_gpu", True)):
        rows = _rows(out / f"{placement}.jsonl")
        before = {r["size_bytes"]: r for r in _rows(out / f"before_{placement}.jsonl") if r.get("bench") == "bandwidth"}
        if not rows and not before:
            continue
        base = "memcpy_peer_GBps" if cross else "memcpy_GBps"
        part: dict = {"baseline": "torch copy GPU0->GPU1" if cross else "torch copy on the GPU"}
        part["sync_MiB_ipcGBps_copyGBps_ratio_before"] = [
            [r["size_bytes"] >> 20, r.get("ipc_GBps"), r.get(base), _ratio(r, cross),
             _ratio(before.get(r["size_bytes"], {}), cross)]
            for r in rows if r.get("bench") == "bandwidth" and "ipc_error" not in r]
        part["sync_errors"] = [r["ipc_error"] for r in rows if r.get("ipc_error")]
        part["pipelined_MiB_issue_threads_ratios_match"] = [
            [r["size_bytes"] >> 20, _ratio(r, cross, "ipc_issue"), _ratio(r, cross, "ipc_threads"), r["bytes_match"]]
            for r in rows if r.get("bench") == "pipelined" and "size_bytes" in r]
        part["pipelined_errors"] = [r["error"] for r in rows if r.get("bench") == "pipelined" and "error" in r]
        part["requests_tokens_blocks_path_ms_match"] = [
            [r["tokens"], r["blocks"], r["path"], r.get("transfer_ms"), r.get("bytes_match", r.get("error"))]
            for r in rows if r.get("bench") == "request"]
        part["profile_ms"] = {r["size_mib"]: r["ms"] for r in rows if r.get("bench") == "ipc_profile"}
        part["copy_paths_ms"] = [{k: v for k, v in r.items() if k != "bench"} for r in rows
                                 if r.get("bench") == "ipc_copy_paths"]
        summary[placement] = part
    return summary


if __name__ == "__main__":
    print(json.dumps(summarize(Path(sys.argv[1])), separators=(",", ":")))
