"""The etcd key layout of one pdserve cluster, and WorkerInfo's JSON form.

    /pdserve/<cluster>/workers/<role>/<worker_id>   WorkerInfo JSON, under the worker's lease
    /pdserve/<cluster>/drain/<worker_id>            DrainFlag JSON (no lease: survives restarts)
    /pdserve/<cluster>/kv-quota/<worker_id>         KV quota override, JSON {"num_blocks": N}

Invariant: every prefix ends with '/', and neither cluster names nor worker ids contain '/', so the
keys of cluster "a" never fall under the prefix of cluster "ab" (or of any other cluster).
"""

from __future__ import annotations

import dataclasses
import json

from cluster.config import validate_cluster_name
from workers.protocol import Role, WorkerInfo

ROOT = "/pdserve"


def validate_worker_id(worker_id: str) -> None:
    if not worker_id or "/" in worker_id or not worker_id.isprintable():
        raise ValueError(f"worker id {worker_id!r} must be a non-empty printable string without '/'")


class ClusterKeys:
    def __init__(self, cluster_name: str):
        validate_cluster_name(cluster_name)
        self.cluster_name = cluster_name
        self.prefix = f"{ROOT}/{cluster_name}/"
        self.workers_prefix = f"{self.prefix}workers/"
        self.drain_prefix = f"{self.prefix}drain/"
        self.kv_quota_prefix = f"{self.prefix}kv-quota/"

    def role_prefix(self, role: Role | str) -> str:
        return f"{self.workers_prefix}{Role(role).value}/"

    def worker(self, role: Role | str, worker_id: str) -> str:
        validate_worker_id(worker_id)
        return f"{self.role_prefix(role)}{worker_id}"

    def drain(self, worker_id: str) -> str:
        validate_worker_id(worker_id)
        return f"{self.drain_prefix}{worker_id}"

    def kv_quota(self, worker_id: str) -> str:
        validate_worker_id(worker_id)
        return f"{self.kv_quota_prefix}{worker_id}"


def encode_worker_info(info: WorkerInfo) -> bytes:
    fields = dataclasses.asdict(info)
    fields["role"] = Role(info.role).value
    return json.dumps(fields, sort_keys=True).encode()


def decode_worker_info(value: bytes) -> WorkerInfo:
    """Raises ValueError when the value is not a WorkerInfo written by encode_worker_info."""
    try:
        fields = json.loads(value)
        fields["role"] = Role(fields["role"])
        return WorkerInfo(**fields)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a WorkerInfo JSON value ({e!r}): {value[:200]!r}") from e
