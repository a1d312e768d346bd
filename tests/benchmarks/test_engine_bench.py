"""CI smoke run of benchmarks/engine.py: it runs end to end on the CPU and prints one well-formed
JSON line per workload. No timing is asserted (speed is read off the numbers, not tested)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("workload", "engine_tok_s", "hf_tok_s", "ratio", "device",
            "async_engine_tok_s", "async_ratio", "async_speedup", "async_tokens_match")


def test_engine_benchmark_smoke(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "engine.py"), "--smoke",
                        "--cache-dir", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"benchmark failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["workload"] for row in rows] == ["decode_b1", "batch4", "many"], r.stdout
    for row in rows:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"{row['workload']}: missing {missing}"
        assert row["device"] == "cpu"
        assert "hf_error" not in row, row["hf_error"]
        for key in ("engine_tok_s", "hf_tok_s", "ratio", "async_engine_tok_s", "async_ratio", "async_speedup"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["async_tokens_match"] is True, row  # sync and async scheduling: same tokens
    assert rows[0]["engine_step_ms"] > 0 and rows[0]["hf_step_ms"] > 0 and rows[0]["async_engine_step_ms"] > 0
