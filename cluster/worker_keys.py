"""The manager's direct reads and writes of worker registration keys in etcd (the workers own
their keys; the manager only looks at leases and deletes the key of a worker it killed)."""

from __future__ import annotations

import logging

from cluster.config import EtcdConfig
from cluster.etcd_client import EtcdConnector, EtcdUnavailableError, close_quietly
from cluster.keys import ClusterKeys
from workers.protocol import Role

log = logging.getLogger(__name__)


async def read_leases(etcd: EtcdConfig, cluster_name: str, workers: list[tuple[Role, str]],
                      timeout_s: float = 2.0) -> dict[str, dict]:
    """{worker_id: {lease_id, granted_ttl_s, remaining_ttl_s}} for the workers whose key exists.
    Raises EtcdUnavailableError."""
    keys = ClusterKeys(cluster_name)
    client = EtcdConnector(etcd, request_timeout_s=timeout_s).new_client()
    out = {}
    try:
        for role, worker_id in workers:
            got = await client.get(keys.worker(role, worker_id).encode())
            if got is not None and got.lease:
                info = await client.get_lease_info(got.lease, keys=False)
                out[worker_id] = {"lease_id": got.lease, "granted_ttl_s": info.grantedTTL, "remaining_ttl_s": info.TTL}
    except Exception as e:
        raise EtcdUnavailableError(f"reading worker leases from etcd failed: {type(e).__name__}: {e}") from e
    finally:
        await close_quietly(client)
    return out


async def delete_worker_key(etcd: EtcdConfig, cluster_name: str, role: Role, worker_id: str,
                            timeout_s: float = 2.0) -> bool:
    """Remove a (killed) worker's key now rather than when its lease expires. False (logged) if
    etcd could not be reached: the key then goes with the lease."""
    client = EtcdConnector(etcd, request_timeout_s=timeout_s).new_client()
    try:
        await client.delete(ClusterKeys(cluster_name).worker(role, worker_id).encode())
        return True
    except Exception as e:
        log.warning("could not delete the registration of removed worker %s (it expires with its lease): %r",
                    worker_id, e)
        return False
    finally:
        await close_quietly(client)
