"""Property-based requests (schemathesis, from the API's own OpenAPI spec) against the live
management API: no 5xx, every response matches the spec (status, content type, body schema).
Scaling is fuzzed with invalid bodies only (valid ones would start workers); the worker routes
get random ids, i.e. unknown workers."""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from tests.control_plane.conftest import TOKEN


def operations(spec):
    for result in schemathesis.openapi.from_dict(spec).get_all_operations():
        yield result.ok()


def test_management_api_holds_its_spec_under_fuzzing(cluster, admin):
    spec = admin.get("/openapi.json").json()
    ops = list(operations(spec))
    assert len(ops) >= 12
    auth = {"Authorization": f"Bearer {TOKEN}"}
    failures, calls = [], []
    for op in ops:
        modes = [GenerationMode.NEGATIVE] if op.path.endswith("/scale") else [GenerationMode.POSITIVE,
                                                                               GenerationMode.NEGATIVE]
        for mode in modes:
            @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                      derandomize=True)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                calls.append(case.call_and_validate(base_url=cluster.admin_url, headers=auth).status_code)

            try:
                run()
            except Exception as e:  # collect all operations' failures, then report them together
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {type(e).__name__}: {str(e)[:600]}")
    assert not failures, "\n\n".join(failures)
    assert len(calls) >= 100 and {200, 400, 404} <= set(calls), sorted(set(calls))
    pools = {p["role"]: p["desired"] for p in admin.get("/cluster").json()["pools"]}
    assert pools == {"prefill": 1, "decode": 1}  # fuzzing changed nothing
