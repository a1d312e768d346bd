"""Every engine test runs twice: synchronous scheduling and async scheduling (the step launched
before the previous one's tokens are read back). make_engine() builds engines in the current mode
unless a test asks for one explicitly.

Under TRITON_INTERPRET=1 (triton_interpret_cases.py, run in a subprocess by
test_triton_attention.py) the modes come from PDSERVE_TEST_SCHEDULING (comma-separated): the parent
passes both, and one interpreter process runs the cases in each."""

import os

import pytest

from tests.workers.engine import helpers

MODES = os.environ.get("PDSERVE_TEST_SCHEDULING", "sync").split(",") if os.environ.get("TRITON_INTERPRET") == "1" \
    else ["sync", "async"]


@pytest.fixture(scope="session", params=MODES, autouse=True)
def scheduling(request):
    """'sync' or 'async': the mode make_engine() uses. Module-scoped fixtures that build engines
    depend on it, so they are rebuilt per mode."""
    helpers.ASYNC_SCHEDULING = request.param == "async"
    yield request.param
    helpers.ASYNC_SCHEDULING = False
