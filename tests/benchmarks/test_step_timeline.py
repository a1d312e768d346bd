"""benchmarks/cuda_kernels.py's step timeline (profile_decode.py --timeline), on the CPU: the
busy time is the union of the ops' intervals, and a real engine's async steps give a busy, span
and idle split with the ops by time."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cuda_kernels import busy_time, step_timeline

REPO = Path(__file__).resolve().parents[2]


def test_busy_time_counts_overlaps_once():
    assert busy_time([]) == 0
    assert busy_time([(0, 10), (5, 15), (20, 30), (21, 22)]) == 25  # [0, 15) and [20, 30)
    assert busy_time([(3, 4), (0, 10)]) == 10  # nested, in any order


def test_timeline_of_real_engine_steps(tmp_path):
    """A tiny engine's async decode steps profiled as the GPU scripts profile theirs (its CPU ops
    standing in for kernels): busy <= span, idle = span - busy, the ops named."""
    script = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from benchmarks.cuda_kernels import step_timeline
from benchmarks.engine import build_model, prompts
from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.engine import Engine
from workers.protocol import SamplingParams
d = build_model("tiny", Path({str(tmp_path)!r}))
e = Engine(ModelConfig(device="cpu", dtype="float32"), EngineConfig(block_size=16, num_kv_blocks=64, max_num_seqs=4), d)
for i, p in enumerate(prompts(4, 16, e.vocab_size, 4)):
    e.add_request(f"r{{i}}", p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
e.async_scheduling = True
for _ in range(3):
    e.step()
print("TIMELINE " + json.dumps(step_timeline(e.step, steps=8, device_type="CPU", top=5)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("TIMELINE "))
    t = json.loads(line[len("TIMELINE "):])
    assert t["steps"] == 8 and 0 < t["busy_us"] <= t["span_us"]
    assert t["idle_us"] == pytest.approx(t["span_us"] - t["busy_us"], abs=0.2)
    names = [name for name, _ in t["ops_us"]]
    assert any("linear" in n or "mm" in n for n in names), names


def test_timeline_says_when_nothing_ran_on_the_device():
    assert "error" in step_timeline(lambda: None, steps=2, device_type="CPU")
