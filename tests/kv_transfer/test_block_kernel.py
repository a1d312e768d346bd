"""Runs the block-table kernel's checks (block_kernel_cases.py) on the CPU through Triton's
interpreter, in a fresh process: TRITON_INTERPRET=1 must be set before triton is first imported,
and other tests in this process import it without it."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("block_kernel_cases.py")
CASE_NAMES = {"test_scattered_ids_over_many_segments_in_one_launch",
              "test_contiguous_ids_over_segment_boundaries_in_one_launch",
              "test_the_reader_takes_the_kernel_and_waits_for_it", "test_warm_up_launches_nothing_that_copies"}


def test_block_table_kernel_under_the_interpreter():
    try:
        import triton  # noqa: F401
    except ImportError:
        raise AssertionError("triton is not installed: pip install -e '.[test]' (it pins triton for these checks)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(CASES)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"interpreted kernel checks failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    ran = {line.split("::", 1)[1].split("[", 1)[0].split(" ", 1)[0] for line in r.stdout.splitlines()
           if "::" in line and "PASSED" in line}
    assert ran >= CASE_NAMES, r.stdout[-3000:]
