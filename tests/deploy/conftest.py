"""tests/deploy: offline validation of deploy/ and the two-host (network namespace) harness.

The SSH test (test_ray_up_ssh.py, marked `ssh`) is collected only when PDSERVE_TEST_SSH=1: it
needs an SSH server on loopback (see README.md, "Deployment").
"""

from __future__ import annotations

import os

collect_ignore = [] if os.environ.get("PDSERVE_TEST_SSH") == "1" else ["test_ray_up_ssh.py"]
