"""`pdserve cluster ...`: a thin client of the management API.

The URL comes from --url, else PDSERVE_ADMIN_URL, else http://127.0.0.1:8001; the token from
--token, else PDSERVE_ADMIN_TOKEN, else the token file `pdserve up` wrote for --cluster-name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx


def add_cluster_commands(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("PDSERVE_ADMIN_URL", "http://127.0.0.1:8001"))
    parser.add_argument("--token", default=os.environ.get("PDSERVE_ADMIN_TOKEN"))
    parser.add_argument("--cluster-name", default="default", help="to find the token file of a local cluster")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("status", help="pools, readiness, totals").set_defaults(func=_status)
    sub.add_parser("workers", help="every worker with its state, load and KV use").set_defaults(func=_workers)
    scale = sub.add_parser("scale", help="set a pool's replica count")
    scale.add_argument("role", choices=["prefill", "decode"])
    scale.add_argument("replicas", type=int)
    scale.set_defaults(func=_scale)
    drain = sub.add_parser("drain", help="stop routing to a worker, let it finish, then remove it")
    drain.add_argument("worker_id")
    drain.add_argument("--timeout", type=float, default=None, help="seconds in-flight requests may take")
    drain.set_defaults(func=_drain)
    remove = sub.add_parser("remove", help="remove a worker now (its requests fail over)")
    remove.add_argument("worker_id")
    remove.set_defaults(func=_remove)
    quota = sub.add_parser("quota", help="show KV quotas, or set one worker's (num_blocks)")
    quota.add_argument("worker_id", nargs="?")
    quota.add_argument("num_blocks", nargs="?", type=int)
    quota.set_defaults(func=_quota)


def _client(a) -> httpx.Client:
    token = a.token
    if not token:
        from cluster.launcher import run_dir

        path = run_dir(a.cluster_name) / "admin-token"
        if path.exists():
            token = path.read_text().strip()
    if not token:
        raise SystemExit("no management token: pass --token, set PDSERVE_ADMIN_TOKEN, or run on the host of "
                         "`pdserve up` (it writes the token file)")
    return httpx.Client(base_url=a.url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def _call(a, method: str, path: str, body: dict | None = None) -> int:
    try:
        with _client(a) as c:
            r = c.request(method, path, json=body)
    except httpx.HTTPError as e:
        print(f"error: cannot reach the management API at {a.url}: {e}", file=sys.stderr)
        return 1
    try:
        data = r.json()
    except ValueError:
        data = r.text
    print(json.dumps(data, indent=2) if not isinstance(data, str) else data)
    return 0 if r.is_success else 1


def _status(a) -> int:
    return _call(a, "GET", "/cluster")


def _workers(a) -> int:
    return _call(a, "GET", "/cluster/workers")


def _scale(a) -> int:
    return _call(a, "POST", f"/cluster/pools/{a.role}/scale", {"replicas": a.replicas})


def _drain(a) -> int:
    return _call(a, "POST", f"/cluster/workers/{a.worker_id}/drain", {"timeout_s": a.timeout} if a.timeout else {})


def _remove(a) -> int:
    return _call(a, "DELETE", f"/cluster/workers/{a.worker_id}")


def _quota(a) -> int:
    if a.worker_id is None:
        return _call(a, "GET", "/cluster/kv-quota")
    if a.num_blocks is None:
        raise SystemExit("usage: pdserve cluster quota WORKER_ID NUM_BLOCKS")
    return _call(a, "PUT", f"/cluster/kv-quota/{a.worker_id}", {"num_blocks": a.num_blocks})
