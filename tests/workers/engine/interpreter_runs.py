"""The Triton interpreter's processes (test_triton_attention.py): started once, as soon as the
suite is collected (tests/conftest.py), so that they run in the background at the lowest CPU
priority while the rest of the suite runs (much of it waits on Ray, etcd and HTTP), instead of
~1.5 minutes of their own at the end. TRITON_INTERPRET=1 must be set before triton is first
imported, so these are fresh processes. Output goes to files: a pipe would fill up and stall a
process nobody reads yet."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CASES = Path(__file__).with_name("triton_interpret_cases.py")
DECODE_CASES = Path(__file__).with_name("triton_decode_cases.py")
# the kernel cases run both scheduling modes in one process (conftest.py reads them from
# PDSERVE_TEST_SCHEDULING): its start-up (torch, triton, pytest, ~6 s) is paid once
KERNEL_SCHEDULING = "sync,async"
# these run in a process of their own; the rest of triton_decode_cases.py in another
DECODE_SHARD = ("test_split_decode_matches_reference", "test_split_decode_padded_rows",
                "test_split_decode_settings_are_checked")

_runs: dict[str, tuple[subprocess.Popen, Path]] = {}


def _start(name: str, scheduling: str, *targets: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PDSERVE_TEST_SCHEDULING=scheduling, OMP_NUM_THREADS="1")
    fd, log = tempfile.mkstemp(prefix=f"pdserve-interpret-{name}-", suffix=".log")
    with os.fdopen(fd, "w") as out:
        p = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                              *targets], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    _runs[name] = (p, Path(log))


def start() -> None:
    """Start the three processes (once): the split decode cases in two, the other kernels' cases in
    a third, each single-threaded."""
    if _runs:
        return
    decode = str(DECODE_CASES.relative_to(REPO))  # as in node ids (--deselect compares them)
    shard = [f"{decode}::{name}" for name in DECODE_SHARD]
    _start("decode", "sync", *shard)
    _start("decode_rest", "sync", decode, *(f"--deselect={n}" for n in shard))
    _start("kernels", KERNEL_SCHEDULING, str(CASES))


def result(name: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Wait for one process; its exit code and output."""
    start()
    p, log = _runs[name]
    p.wait(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, log.read_text(), "")


def stop() -> None:
    """Kill whatever still runs and remove the logs (end of the session)."""
    for p, log in _runs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
        log.unlink(missing_ok=True)
    _runs.clear()
