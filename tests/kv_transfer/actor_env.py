"""Environment variables for the test actors."""

from __future__ import annotations

import os


def actor_runtime_env(env_vars: dict[str, str]) -> dict | None:
    """runtime_env for an actor that needs env_vars: only those its Ray worker process would not
    inherit already (Ray's processes get this process' environment, set before ray.init: see
    tests/conftest.py). An actor with env vars of its own cannot use one of Ray's already started
    worker processes: each such start waited ~0.6 s more for a new one."""
    own = {k: v for k, v in env_vars.items() if os.environ.get(k) != v}
    return {"env_vars": own} if own else None
