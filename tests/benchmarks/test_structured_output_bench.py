"""CI smoke run of benchmarks/structured_output.py on the tiny model: one well-formed JSON line, and
both runs decoded every token (the grammar cannot end early) and every constrained output follows
its schema. No timing is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_structured_output_benchmark_smoke(tiny_checkpoint):
    cache_dir = Path(tiny_checkpoint("llama")).parent  # --model tiny: the suite's tiny llama
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "structured_output.py"), "--model", "tiny",
                        "--cache-dir", str(cache_dir), "--batch", "3", "--prompt-len", "8", "--out-len", "12"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"benchmark failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (row,) = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert row["benchmark"] == "structured_output" and row["device"] == "cpu" and row["tokens"] == [36, 36], row
    assert row["grammar_valid"] == "3/3", row  # each output replayed through a fresh matcher
    for key in ("free_tok_s", "grammar_tok_s", "ratio", "fill_bitmask_ms_per_step", "compile_ms"):
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (key, row)
