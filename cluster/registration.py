"""WorkerRegistration: keeps one worker's key in etcd for as long as the worker lives.

Lifecycle of /pdserve/<cluster>/workers/<role>/<worker_id>:
  register   grant a lease (ttl_s), then put-if-absent (txn: create_revision == 0) under it
  refresh    keepalive every ttl_s/3; etcd answering TTL <= 0 means the lease (and the key) is
             gone, e.g. it expired during an outage: register again (num_reregistrations += 1)
  outage     any error drops the client and retries with backoff, forever; the worker never sees
             an exception. The lease is kept: etcd extends leases when it comes back.
  deregister revoke the lease (deletes the key at once); stop_refreshing() instead leaves the key
             to expire within ttl_s, as a hung or killed worker would.

Conflicts: if the key exists under another lease and holds this same incarnation (same worker_id
and started_at, e.g. our put applied but its reply was lost), it is re-bound to the new lease.
A different incarnation (another process with the same id) is never overwritten: we wait for its
lease to expire and report it in `last_error`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from cluster.config import EtcdConfig
from cluster.etcd_client import Backoff, EtcdConnector, close_quietly
from cluster.keys import ClusterKeys, decode_worker_info, encode_worker_info
from cluster.loop_thread import LoopThread
from workers.protocol import WorkerInfo

log = logging.getLogger(__name__)


class RegistrationConflict(RuntimeError):
    """Another live process holds this worker id's key."""


class WorkerRegistration:
    def __init__(
        self,
        etcd_config: EtcdConfig,
        cluster_name: str,
        info: WorkerInfo,
        *,
        connector: EtcdConnector | None = None,
    ):
        self.ttl_s = etcd_config.lease_ttl_s
        self.refresh_interval_s = self.ttl_s / 3
        self.key = ClusterKeys(cluster_name).worker(info.role, info.worker_id)
        self._connector = connector or EtcdConnector(etcd_config, request_timeout_s=min(5.0, self.ttl_s / 2))
        self._info = info
        self._value = encode_worker_info(info)
        self._task: asyncio.Task | None = None
        self._thread: LoopThread | None = None
        self._client = None
        self._registered = threading.Event()  # mirrors is_registered for sync waiters
        self._backoff = Backoff(initial_s=0.2, max_s=min(2.0, self.refresh_interval_s))
        # Observable state (read from any thread).
        self.lease_id: int | None = None
        self.is_registered = False
        self.is_etcd_reachable = False
        self.last_refresh_at: float | None = None  # unix time of the last successful register/refresh
        self.num_registrations = 0
        self.last_error: str | None = None

    @property
    def info(self) -> WorkerInfo:
        return self._info

    @property
    def num_reregistrations(self) -> int:
        return max(0, self.num_registrations - 1)

    # --- asyncio interface ---------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the background task on the running loop; returns at once (see wait_registered)."""
        if self._task is not None:
            raise RuntimeError(f"registration of {self.key} already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"etcd-registration {self.key}")

    async def wait_registered(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self._registered.is_set():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def update_info(self, info: WorkerInfo) -> None:
        """Replaces the registered value (same worker id and role), e.g. after a KV resize. Written
        now if registered, else at the next registration."""
        if (info.worker_id, info.role) != (self._info.worker_id, self._info.role):
            raise ValueError("update_info cannot change worker_id or role (that is another key)")
        self._info, self._value = info, encode_worker_info(info)
        if self.is_registered and self._client is not None and self.lease_id is not None:
            try:
                await self._client.put(self.key.encode(), self._value, lease=self.lease_id)
            except Exception as e:  # the refresh loop re-registers with the new value if needed
                log.warning("updating %s failed (%r); will be written on re-registration", self.key, e)

    async def stop_refreshing(self) -> None:
        """Stops the keepalive without deleting anything: the key expires within ttl_s."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await close_quietly(self._client)
        self._client = None

    async def deregister(self, timeout_s: float = 5.0) -> bool:
        """Stops refreshing and removes the key now. False if etcd could not be reached within
        timeout_s (the key then expires with its lease); never raises for etcd errors."""
        lease_id = self.lease_id
        await self.stop_refreshing()
        self._set_registered(False)
        client = self._connector.new_client()
        try:
            await asyncio.wait_for(self._remove(client, lease_id), timeout_s)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.last_error = f"deregister: {type(e).__name__}: {e}"
            log.warning("could not deregister %s (%s); it expires within %d s", self.key, self.last_error, self.ttl_s)
            return False
        finally:
            self.lease_id = None
            await close_quietly(client)

    async def _remove(self, client, lease_id: int | None) -> None:
        if lease_id is not None:
            await client.revoke_lease(lease_id)  # deletes every key under the lease
        # The key may still exist under a lease we lost track of; delete it only if it is ours.
        tx = client.transactions
        await client.transaction(
            compare=[tx.value(self.key.encode()) == self._value],
            success=[tx.delete(self.key.encode())],
            failure=[],
        )

    # --- thread interface (for sync callers) ---------------------------------------------------

    def start_in_thread(self) -> None:
        """Runs the registration on its own event-loop thread."""
        if self._thread is not None:
            raise RuntimeError(f"registration of {self.key} already runs in a thread")
        self._thread = LoopThread(name=f"pdserve-registration-{self._info.worker_id}")
        self._thread.run(self.start())

    def wait_registered_sync(self, timeout_s: float) -> bool:
        return self._registered.wait(timeout_s)

    def stop_in_thread(self, deregister: bool = True, timeout_s: float = 5.0) -> bool:
        """Deregisters (or just stops refreshing) and ends the thread. Returns deregister()'s result
        (True when not deregistering)."""
        if self._thread is None:
            raise RuntimeError("start_in_thread() was not called")
        try:
            if deregister:
                return self._thread.run(self.deregister(timeout_s), timeout_s + 5)
            self._thread.run(self.stop_refreshing(), timeout_s)
            return True
        finally:
            self._thread.stop()
            self._thread = None

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if self._client is None:
                    self._client = self._connector.new_client()
                if self.lease_id is None:
                    await self._register(self._client)
                elif not await self._refresh(self._client):
                    continue  # lease lost: register again right away
                self.is_etcd_reachable = True
                self._backoff.reset()
                delay_s = self.refresh_interval_s
            except asyncio.CancelledError:
                raise
            except Exception as e:
                was_reachable, self.is_etcd_reachable = self.is_etcd_reachable, False
                self.last_error = f"{type(e).__name__}: {e}"
                level = logging.WARNING if was_reachable or self._backoff.num_failures == 0 else logging.DEBUG
                log.log(level, "etcd registration of %s: %s; retrying with backoff", self.key, self.last_error)
                await close_quietly(self._client)
                self._client = None
                delay_s = self._backoff.next_delay_s()
                if isinstance(e, RegistrationConflict):
                    delay_s = self.refresh_interval_s
            await asyncio.sleep(delay_s)

    async def _refresh(self, client) -> bool:
        reply = await client.refresh_lease(self.lease_id)
        if reply is None or reply.TTL <= 0:
            log.warning("lease of %s was lost (expired or revoked); registering again", self.key)
            self.lease_id = None
            self._set_registered(False)
            return False
        self.last_refresh_at = time.time()
        return True

    async def _register(self, client) -> None:
        key, tx = self.key.encode(), client.transactions
        lease = await client.lease(self.ttl_s)
        try:
            ok, responses = await client.transaction(
                compare=[tx.create(key) == 0],
                success=[tx.put(key, self._value, lease=lease.id)],
                failure=[tx.get(key)],
            )
            if not ok:
                ok = await self._take_over(client, responses, lease.id)
        except BaseException:
            await _revoke_quietly(client, lease.id)
            raise
        if not ok:
            await _revoke_quietly(client, lease.id)
            raise RegistrationConflict(f"{self.key} vanished or changed while registering; retrying")
        self.lease_id = lease.id
        self.num_registrations += 1
        self.last_refresh_at = time.time()
        self.last_error = None
        self._set_registered(True)
        log.info("registered %s (lease %x, ttl %d s, registration #%d)", self.key, lease.id, self.ttl_s, self.num_registrations)

    async def _take_over(self, client, responses, lease_id: int) -> bool:
        """The key exists: re-bind it to lease_id if it is this incarnation's, else raise."""
        existing = responses[0] if responses else []
        if not existing:
            return False  # deleted between compare and get: the next attempt will create it
        raw, kv = existing[0]
        try:
            theirs = decode_worker_info(raw)
            same_incarnation = (theirs.worker_id, theirs.started_at) == (self._info.worker_id, self._info.started_at)
        except ValueError:
            same_incarnation = False
        if not same_incarnation:
            raise RegistrationConflict(
                f"{self.key} is held by another live process (lease {kv.lease:x}); "
                f"waiting up to {self.ttl_s} s for it to expire. Worker ids must be unique per cluster."
            )
        key, tx = self.key.encode(), client.transactions
        ok, _ = await client.transaction(
            compare=[tx.mod(key) == kv.mod_revision],
            success=[tx.put(key, self._value, lease=lease_id)],
            failure=[],
        )
        if ok and kv.lease and kv.lease != lease_id:
            await _revoke_quietly(client, kv.lease)  # the old lease has no keys left
        return ok

    def _set_registered(self, value: bool) -> None:
        self.is_registered = value
        if value:
            self._registered.set()
        else:
            self._registered.clear()


async def _revoke_quietly(client, lease_id: int) -> None:
    try:
        await client.revoke_lease(lease_id)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # an unrevoked lease without keys just expires
        log.debug("revoking lease %x failed: %r", lease_id, e)
