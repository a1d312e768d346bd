"""Runs the Triton kernel checks (triton_interpret_cases.py, triton_decode_cases.py) on the CPU
through Triton's interpreter, in fresh processes: TRITON_INTERPRET=1 must be set before triton is
first imported, and other tests in this process import it (through transformers) without it."""

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
ASYNC_CASE_NAMES = ("test_engine_fused_decode_matches_generate",)  # run in the async mode only
KERNEL_CASE_NAMES = ("test_kernels_match_torch_reference", "test_padded_decode_rows_write_nothing",
                     "test_gemv_matches_linear", "test_fused_projections_on_ragged_shapes_match_torch",
                     "test_greedy_argmax_matches_torch", "test_compiled_path_op_matches_direct_call")
DECODE_CASE_NAMES = ("test_split_decode_matches_reference", "test_split_decode_auto_splits_bf16",
                     "test_split_decode_padded_rows", "test_split_decode_settings_are_checked",
                     "test_decode_rows_bit_identical_in_any_step",
                     "test_engine_split_decode_same_twice_with_prefix_hits", "test_engine_split_decode_matches_generate")
# these run in a process of their own; the rest of triton_decode_cases.py in another (~35 and
# ~45 s of CPU on the 2-core box)
DECODE_SHARD = ("test_split_decode_matches_reference", "test_split_decode_padded_rows",
                "test_split_decode_settings_are_checked")


@pytest.fixture(scope="module", autouse=True)
def scheduling():
    """Both modes in one interpreter process (conftest.py reads them from PDSERVE_TEST_SCHEDULING):
    its start-up (torch, triton, pytest, ~6 s) is paid once, not once per suite-wide mode."""
    return "sync,async"


def _start(scheduling: str, *targets: str) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="1", PDSERVE_TEST_SCHEDULING=scheduling, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *targets],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def interpreter_runs(scheduling):
    """The interpreter processes start together, each one single-threaded Python process: the
    split decode cases in two, the other kernels' cases in a third. Side by side they share CI's
    2 cores (~1 minute instead of ~2 one after the other), none much longer than the others."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise AssertionError("triton is not installed: pip install -e '.[test]' (it pins triton for these checks)")
    decode = str(DECODE_CASES.relative_to(REPO))  # as in node ids (--deselect compares them)
    shard = [f"{decode}::{name}" for name in DECODE_SHARD]
    runs = {"decode": _start("sync", *shard),
            "decode_rest": _start("sync", decode, *(f"--deselect={n}" for n in shard)),
            "kernels": _start(scheduling, str(CASES))}
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
    """The split decode kernel's cases (two interpreter processes): its engine cases run in the
    suite's sync mode with decode_kernel 'split' and 16-key chunks set on the engine (the engine
    cases of triton_interpret_cases.py run the default chunking, one chunk a prompt)."""
    ran, out = set(), ""
    for name in ("decode", "decode_rest"):
        r = _interpret(interpreter_runs, name)
        ran |= {line.split("::", 1)[1].split("[", 1)[0] for line in r.stdout.splitlines() if "PASSED" in line}
        out += r.stdout[-1500:]
    assert ran >= set(DECODE_CASE_NAMES), out


def test_triton_kernels_under_the_interpreter(scheduling, interpreter_runs):
    r = _interpret(interpreter_runs, "kernels")
    for mode, names in [(m, CASE_NAMES) for m in scheduling.split(",")] + [("once", KERNEL_CASE_NAMES),
                                                                          ("async", ASYNC_CASE_NAMES)]:
        ran = {line.split("::", 1)[1].split("[", 1)[0] for line in r.stdout.splitlines()
               if "::" in line and (f"[{mode}" in line or f"-{mode}]" in line) and "PASSED" in line}
        assert ran >= set(names), (mode, ran, r.stdout[-3000:])
