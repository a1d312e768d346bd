"""MembershipWatcher: which workers are registered, as the router and manager see it.

A PrefixMirror of /pdserve/<cluster>/workers/ decoded to WorkerInfo. PUT adds or updates a worker,
DELETE (deregistration or lease expiry) removes it; after any reconnect the whole prefix is re-read,
so a delete missed while disconnected is still applied. While etcd is unreachable the last known
membership stays (serving continues on it) and `is_connected` is False.
"""

from __future__ import annotations

from collections.abc import Callable

from cluster.config import EtcdConfig
from cluster.etcd_client import EtcdConnector
from cluster.keys import ClusterKeys, decode_worker_info
from cluster.loop_thread import LoopThread
from cluster.prefix_mirror import KeyChange, PrefixMirror
from workers.protocol import Role, WorkerInfo

MembershipChange = KeyChange[WorkerInfo]  # name: "<role>/<worker_id>"


def _decode_member(name: str, raw: bytes) -> WorkerInfo:
    info = decode_worker_info(raw)
    if name != f"{info.role.value}/{info.worker_id}":
        raise ValueError(f"key {name!r} does not match its value (role {info.role.value}, id {info.worker_id})")
    return info


class MembershipWatcher:
    def __init__(
        self,
        etcd_config: EtcdConfig,
        cluster_name: str,
        *,
        connector: EtcdConnector | None = None,
        probe_interval_s: float = 2.0,
    ):
        self.keys = ClusterKeys(cluster_name)
        self._connector = connector or EtcdConnector(etcd_config)
        self._mirror: PrefixMirror[WorkerInfo] = PrefixMirror(
            self._connector, self.keys.workers_prefix, _decode_member, probe_interval_s=probe_interval_s
        )
        self._thread: LoopThread | None = None

    # --- state (readable from any thread) ------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._mirror.is_connected

    @property
    def is_synced(self) -> bool:
        """True once the membership was read at least once."""
        return self._mirror.is_synced

    @property
    def num_resyncs(self) -> int:
        return self._mirror.num_resyncs

    @property
    def version(self) -> int:
        """Bumps on every membership change."""
        return self._mirror.version

    @property
    def last_error(self) -> str | None:
        return self._mirror.last_error

    def members(self, role: Role | str | None = None) -> list[WorkerInfo]:
        """Registered workers (of one role, or all), sorted by worker id."""
        infos = self._mirror.items().values()
        if role is not None:
            role = Role(role)
            infos = [i for i in infos if i.role == role]
        return sorted(infos, key=lambda i: i.worker_id)

    def member(self, worker_id: str) -> WorkerInfo | None:
        for info in self._mirror.items().values():
            if info.worker_id == worker_id:
                return info
        return None

    def is_ready(self, min_prefill: int, min_decode: int) -> tuple[bool, str]:
        """(ready, reason): ready when at least min_prefill prefill and min_decode decode workers
        are registered. The reason is meant for a 503 body and for `pdserve up` progress."""
        if not self.is_synced:
            detail = f": {self.last_error}" if self.last_error else ""
            return False, f"waiting for etcd at {', '.join(self._connector.endpoints)}{detail}"
        num_prefill, num_decode = len(self.members(Role.PREFILL)), len(self.members(Role.DECODE))
        counts = f"{num_prefill}/{min_prefill} prefill, {num_decode}/{min_decode} decode registered"
        stale = "" if self.is_connected else " (etcd unreachable: last known membership)"
        if num_prefill >= min_prefill and num_decode >= min_decode:
            return True, f"ready: {counts}{stale}"
        return False, f"waiting for workers: {counts}{stale}"

    def add_listener(self, listener: Callable[[MembershipChange], None]) -> None:
        """listener(change) runs on the watcher's loop for each add ("put"), update ("put") and
        removal ("delete", with the last known WorkerInfo)."""
        self._mirror.add_listener(listener)

    # --- asyncio interface ---------------------------------------------------------------------

    async def start(self) -> None:
        await self._mirror.start()

    async def stop(self) -> None:
        await self._mirror.stop()

    async def wait_synced(self, timeout_s: float) -> bool:
        return await self._mirror.wait_synced(timeout_s)

    async def wait_for_change(self, timeout_s: float, since_version: int | None = None) -> bool:
        return await self._mirror.wait_for_change(timeout_s, since_version)

    # --- thread interface (for sync callers) ---------------------------------------------------

    def start_in_thread(self) -> None:
        if self._thread is not None:
            raise RuntimeError("membership watcher already runs in a thread")
        self._thread = LoopThread(name=f"pdserve-membership-{self.keys.cluster_name}")
        self._thread.run(self.start())

    def wait_synced_sync(self, timeout_s: float) -> bool:
        if self._thread is None:
            raise RuntimeError("start_in_thread() was not called")
        return self._thread.run(self.wait_synced(timeout_s))

    def stop_in_thread(self) -> None:
        if self._thread is None:
            return
        try:
            self._thread.run(self.stop(), 10)
        finally:
            self._thread.stop()
            self._thread = None
