"""Runs the Triton kernel checks (triton_interpret_cases.py, triton_decode_cases.py) on the CPU
through Triton's interpreter, in fresh processes (interpreter_runs.py: started when the suite is
collected, in the background) and checks that every case ran and passed."""

import pytest

from tests.workers.engine import interpreter_runs

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


@pytest.fixture(scope="module", autouse=True)
def scheduling():
    """Not the engine conftest's per-mode parametrisation: each interpreter process runs its own
    modes (interpreter_runs.py), so these tests run once."""
    return interpreter_runs.KERNEL_SCHEDULING


@pytest.fixture(scope="module", autouse=True)
def triton_installed():
    try:
        import triton  # noqa: F401
    except ImportError:
        raise AssertionError("triton is not installed: pip install -e '.[test]' (it pins triton for these checks)")


def _interpret(name: str):
    r = interpreter_runs.result(name)
    assert r.returncode == 0, f"interpreted kernel checks failed:\n{r.stdout[-8000:]}"
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
    return r


def test_split_decode_kernel_under_the_interpreter():
    """The split decode kernel's cases (two interpreter processes): its engine cases run in the
    suite's sync mode with decode_kernel 'split' and 16-key chunks set on the engine (the engine
    cases of triton_interpret_cases.py run the default chunking, one chunk a prompt)."""
    ran, out = set(), ""
    for name in ("decode", "decode_rest"):
        r = _interpret(name)
        ran |= {line.split("::", 1)[1].split("[", 1)[0] for line in r.stdout.splitlines() if "PASSED" in line}
        out += r.stdout[-1500:]
    assert ran >= set(DECODE_CASE_NAMES), out


def test_triton_kernels_under_the_interpreter():
    r = _interpret("kernels")
    modes = [(m, CASE_NAMES) for m in interpreter_runs.KERNEL_SCHEDULING.split(",")]
    for mode, names in modes + [("once", KERNEL_CASE_NAMES), ("async", ASYNC_CASE_NAMES)]:
        ran = {line.split("::", 1)[1].split("[", 1)[0] for line in r.stdout.splitlines()
               if "::" in line and (f"[{mode}" in line or f"-{mode}]" in line) and "PASSED" in line}
        assert ran >= set(names), (mode, ran, r.stdout[-3000:])
