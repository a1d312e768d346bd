"""WorkerRecords: what the manager keeps in etcd about each of its workers, beside the worker's
own registration.

    registration   /pdserve/<cluster>/workers/<role>/<id>   written by the worker under its lease;
                   deleted here after a kill or a death, so routing stops at once (not at expiry)
    drain flag     /pdserve/<cluster>/drain/<id>            set when a drain starts
    KV override    /pdserve/<cluster>/kv-quota/<id>         a manual KV quota: outlives the manager,
                                                            wins over the resizer's plan

Everything done on a worker's way out is best effort: etcd being away must not stop a drain, a
removal or a replacement. Those calls never raise; they log what they could not do (a registration
then goes with its lease; a stale flag or override only names a worker id that is not reused).
"""

from __future__ import annotations

import logging

from cluster.config import EtcdConfig
from cluster.control_state import ControlState
from workers.protocol import Role

log = logging.getLogger(__name__)


class WorkerRecords:
    def __init__(self, etcd: EtcdConfig, cluster_name: str):
        self.etcd, self.cluster_name = etcd, cluster_name
        self.control = ControlState(etcd, cluster_name)

    async def close(self) -> None:
        await self.control.close()

    # -- KV quota overrides (raise EtcdUnavailableError: the API answers 503) ---------------------
    async def kv_overrides(self) -> dict[str, int]:
        return await self.control.list_kv_quotas()

    async def set_kv_override(self, worker_id: str, num_blocks: int) -> None:
        await self.control.set_kv_quota(worker_id, num_blocks)

    async def clear_kv_override(self, worker_id: str) -> bool:
        """True if there was one."""
        return await self.control.clear_kv_quota(worker_id)

    async def apply_kv_override(self, worker_id: str, actor) -> None:
        """A worker just became ready: give it back its override, if it has one (best effort)."""
        try:
            num_blocks = await self.control.get_kv_quota(worker_id)
            if num_blocks is not None:
                log.info("worker %s: applying its KV quota override (%d blocks)", worker_id, num_blocks)
                await actor.resize.remote(num_blocks)
        except Exception as e:
            log.warning("worker %s: could not apply its KV quota override: %r", worker_id, e)

    # -- registrations ----------------------------------------------------------------------------
    async def leases(self, workers: list[tuple[Role, str]]) -> dict[str, dict]:
        """Registration leases by worker id (raises EtcdUnavailableError)."""
        from cluster.worker_keys import read_leases

        return await read_leases(self.etcd, self.cluster_name, workers)

    async def delete_registration(self, role: Role, worker_id: str) -> None:
        """After a kill or a death: its key goes now, not when the lease expires (an unreachable
        etcd is logged, not raised: the key then goes with its lease)."""
        from cluster.worker_keys import delete_worker_key

        await delete_worker_key(self.etcd, self.cluster_name, role, worker_id)

    # -- a worker's way out -------------------------------------------------------------------------
    async def set_drain_flag(self, worker_id: str) -> None:
        try:
            await self.control.set_drain(worker_id, reason="drain requested through the management API")
        except Exception as e:  # the drain itself does not need etcd: go on, but say so
            log.warning("drain of %s: could not write its etcd drain flag: %r", worker_id, e)

    async def forget(self, worker_id: str) -> None:
        """A worker gone (removed, drained or dead): drop its drain flag and KV quota override."""
        for clear in (self.control.clear_drain, self.control.clear_kv_quota):
            try:
                await clear(worker_id)
            except Exception as e:
                log.warning("could not clear etcd state of removed worker %s: %r", worker_id, e)
