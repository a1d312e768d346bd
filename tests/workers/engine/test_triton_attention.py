"""Runs the Triton kernel checks (triton_interpret_cases.py) on the CPU through Triton's
interpreter, in a fresh process: TRITON_INTERPRET=1 must be set before triton is first imported,
and other tests in this process import it (through transformers) without it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CASES = Path(__file__).with_name("triton_interpret_cases.py")
DECODE_CASES = Path(__file__).with_name("triton_decode_cases.py")
# engine cases run in each scheduling mode; kernel-only cases once (their ids end with "-once]")
CASE_NAMES = ("test_engine_on_triton_backend_matches_generate", "test_padded_decode_steps_match_generate",
              "test_engine_with_gemv_projections_matches_generate", "test_padded_general_steps_match_generate")
KERNEL_CASE_NAMES = ("test_kernels_match_torch_reference", "test_padded_decode_rows_write_nothing",
                     "test_gemv_matches_linear")


@pytest.fixture(scope="module", autouse=True)
def scheduling():
    """Both modes in one interpreter process (conftest.py reads them from PDSERVE_TEST_SCHEDULING):
    its start-up (torch, triton, pytest, ~6 s) is paid once, not once per suite-wide mode."""
    return "sync,async"


def _start(cases: Path, scheduling: str) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="1", PDSERVE_TEST_SCHEDULING=scheduling, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(cases)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def interpreter_runs(scheduling):
    """Both interpreter processes start together (each is one single-threaded Python process:
    side by side they take ~2 minutes on CI's 2 cores instead of ~3 one after the other)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise AssertionError("triton is not installed: pip install -e '.[test]' (it pins triton for these checks)")
    runs = {"decode": _start(DECODE_CASES, "sync"), "kernels": _start(CASES, scheduling)}
    yield runs
    for p in runs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


def _interpret(runs: dict, name: str) -> subprocess.CompletedProcess:
    p = runs[name]
    stdout, stderr = p.communicate(timeout=900)
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    assert r.returncode == 0, f"interpreted kernel checks failed:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
    return r


def test_split_decode_kernel_under_the_interpreter(interpreter_runs):
    """The split decode kernel's cases, in one interpreter process: its engine cases choose both
    scheduling modes themselves (decode_kernel 'split' set on the engine: 'general' is the default,
    which triton_interpret_cases.py's engine cases run)."""
    r = _interpret(interpreter_runs, "decode")
    ran = {line.split("::", 1)[1].split("[", 1)[0] for line in r.stdout.splitlines() if "PASSED" in line}
    assert ran >= {"test_split_decode_matches_reference", "test_split_decode_auto_splits_bf16",
                   "test_split_decode_padded_rows", "test_split_decode_settings_are_checked",
                   "test_decode_rows_bit_identical_in_any_step",
                   "test_engine_split_decode_same_twice_with_prefix_hits",
                   "test_engine_split_decode_matches_generate"}, r.stdout[-3000:]


def test_triton_kernels_under_the_interpreter(scheduling, interpreter_runs):
    r = _interpret(interpreter_runs, "kernels")
    for mode, names in [(m, CASE_NAMES) for m in scheduling.split(",")] + [("once", KERNEL_CASE_NAMES)]:
        ran = {line.split("::", 1)[1].split("[", 1)[0] for line in r.stdout.splitlines()
               if "::" in line and (f"[{mode}" in line or f"-{mode}]" in line) and "PASSED" in line}
        assert ran >= set(names), (mode, ran, r.stdout[-3000:])
