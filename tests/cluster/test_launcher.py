"""`pdserve up --detach` waits for this run's "ready:" line: the log keeps earlier runs of the
same cluster name, whose "ready:" lines must not count (it used to answer ready at once on a
restart, before the cluster served anything); a second `up` of a running cluster is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from cluster.launcher import running_pid, wait_ready


def test_only_this_runs_ready_line_counts(tmp_path):
    log = tmp_path / "pdserve.log"
    log.write_text("ready: http://127.0.0.1:8000/v1\n--- pdserve up ---\n")  # an earlier run's
    start = log.stat().st_size
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        t0 = time.monotonic()
        assert wait_ready(proc, log, start, timeout_s=0.5, poll_s=0.05) == 1  # not ready: the old line
        assert time.monotonic() - t0 >= 0.5

        def later():
            time.sleep(0.3)
            with open(log, "a") as f:
                f.write("loading...\nready: http://127.0.0.1:8000/v1\n")

        threading.Thread(target=later).start()
        assert wait_ready(proc, log, start, timeout_s=10, poll_s=0.05) == 0
    finally:
        proc.kill()
        proc.wait()
    assert wait_ready(proc, log, log.stat().st_size, timeout_s=10, poll_s=0.05) == 1  # it exited


def test_running_pid(tmp_path):
    """Alive and a pdserve (`python -m cluster.cli up` or the pdserve script): running; gone, or
    the pid now another program's (a pid file a killed run left behind): not."""
    assert running_pid(tmp_path) is None
    up = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "cluster.cli", "up"])
    try:
        deadline = time.monotonic() + 10  # until the child runs its own program (the pid file comes later still)
        while b"cluster.cli" not in open(f"/proc/{up.pid}/cmdline", "rb").read() and time.monotonic() < deadline:
            time.sleep(0.01)
        (tmp_path / "pid").write_text(str(up.pid))
        assert running_pid(tmp_path) == up.pid
        (tmp_path / "pid").write_text(str(os.getpid()))  # alive, but pytest
        assert running_pid(tmp_path) is None
    finally:
        up.kill()
        up.wait()
    (tmp_path / "pid").write_text(str(up.pid))  # gone
    assert running_pid(tmp_path) is None
