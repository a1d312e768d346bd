"""PrefixMirror: a local, decoded copy of every key under one etcd prefix, kept current by a watch.

Sync protocol (per connection): get-prefix at revision R, then watch from R+1, so no event falls
between the read and the watch. After ANY watch error or reconnect, the whole prefix is read again
and diffed against the local copy: a watch that reconnects from an old revision can miss deletes
(compaction), a full re-read cannot. While etcd is unreachable the last known copy stays (readers
keep serving on it) and `is_connected` is False.

A watch stream can stay open while etcd is frozen, so a probe read every probe_interval_s checks
the connection too; any failure of either drops the client and starts over with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from cluster.etcd_client import Backoff, EtcdConnector, close_quietly

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class KeyChange(Generic[T]):
    kind: Literal["put", "delete"]
    name: str  # the key with the mirror's prefix removed
    value: T | None  # put: the new value; delete: the last value this mirror knew


class PrefixMirror(Generic[T]):
    """Mirror of `prefix`; `decode(name, raw)` turns a value into T (ValueError: skipped, logged).

    Listeners run on the mirror's event loop, once per change, in etcd revision order; a listener
    that raises is logged and does not stop the mirror.
    """

    def __init__(
        self,
        connector: EtcdConnector,
        prefix: str,
        decode: Callable[[str, bytes], T],
        *,
        probe_interval_s: float = 2.0,
        backoff: Backoff | None = None,
    ):
        if not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must end with '/' (else it matches sibling keys)")
        self.prefix = prefix
        self._connector = connector
        self._decode = decode
        self._probe_interval_s = probe_interval_s
        self._backoff = backoff or Backoff()
        # Copy-on-write: readers on other threads always see a whole dict, never one mid-update.
        self._items: dict[str, T] = {}
        self._listeners: list[Callable[[KeyChange[T]], None]] = []
        self._task: asyncio.Task | None = None
        self._synced: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self.is_connected = False
        self.is_synced = False  # True once the first full read succeeded (stays True after)
        self.revision = 0  # etcd revision the copy reflects
        self.num_resyncs = 0  # full re-reads after the first one
        self.version = 0  # bumps on every local change
        self.last_error: str | None = None
        self.last_sync_at: float | None = None

    def items(self) -> dict[str, T]:
        return self._items

    def get(self, name: str) -> T | None:
        return self._items.get(name)

    def add_listener(self, listener: Callable[[KeyChange[T]], None]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"mirror of {self.prefix} already started")
        self._synced = asyncio.Event()
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"etcd-mirror {self.prefix}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.is_connected = False

    async def wait_synced(self, timeout_s: float) -> bool:
        """True once the prefix has been read at least once (False on timeout)."""
        if self._synced is None:
            raise RuntimeError("start() the mirror first")
        try:
            await asyncio.wait_for(self._synced.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def wait_for_change(self, timeout_s: float, since_version: int | None = None) -> bool:
        """Waits until `version` exceeds since_version (default: the version now); False on timeout.
        Call it on the mirror's own event loop."""
        if self._changed is None:
            raise RuntimeError("start() the mirror first")
        target = self.version if since_version is None else since_version
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.version <= target:
            self._changed.clear()
            remaining_s = deadline - loop.time()
            if remaining_s <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), remaining_s)
            except asyncio.TimeoutError:
                return self.version > target
        return True

    async def _run(self) -> None:
        while True:
            client = self._connector.new_client()
            try:
                await self._sync_and_watch(client)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"
                level = logging.WARNING if self.is_connected or self._backoff.num_failures == 0 else logging.DEBUG
                log.log(level, "etcd watch of %s lost (%s); keeping last known state", self.prefix, self.last_error)
            finally:
                self.is_connected = False
                await close_quietly(client)
            await asyncio.sleep(self._backoff.next_delay_s())

    async def _sync_and_watch(self, client) -> None:
        prefix = self.prefix.encode()
        response = await client.get_prefix(prefix)
        fresh_raw = {kv.key.decode()[len(self.prefix):]: kv.value for kv in response}
        if self.is_synced:
            self.num_resyncs += 1
        self._replace_all(fresh_raw)
        self.revision = response.header.revision
        watch = await client.watch_prefix(prefix, start_revision=self.revision + 1)
        self.is_connected = True
        self.is_synced = True
        self.last_error = None
        self.last_sync_at = time.time()
        self._backoff.reset()
        self._synced.set()
        events = asyncio.ensure_future(self._consume(watch))
        try:
            while not events.done():
                done, _ = await asyncio.wait({events}, timeout=self._probe_interval_s)
                if not done:
                    await client.get(prefix)  # raises if etcd stopped answering
            events.result()  # re-raises the watch's error
            raise ConnectionError("etcd watch stream ended")
        finally:
            events.cancel()

    async def _consume(self, watch) -> None:
        async for event in watch:
            name = event.kv.key.decode()[len(self.prefix):]
            if event.kind == "PUT":
                self._put(name, event.kv.value)
            else:
                self._delete(name)
            self.revision = max(self.revision, event.kv.mod_revision)

    def _replace_all(self, fresh_raw: dict[str, bytes]) -> None:
        for name in [n for n in self._items if n not in fresh_raw]:
            self._delete(name)
        for name, raw in fresh_raw.items():
            self._put(name, raw)

    def _put(self, name: str, raw: bytes) -> None:
        try:
            value = self._decode(name, raw)
        except ValueError as e:
            log.error("ignoring malformed etcd value at %s%s: %s", self.prefix, name, e)
            self._delete(name)
            return
        if self._items.get(name) == value:
            return  # a refresh or resync that changed nothing
        self._items = {**self._items, name: value}
        self._notify(KeyChange("put", name, value))

    def _delete(self, name: str) -> None:
        if name not in self._items:
            return
        old = self._items[name]
        self._items = {n: v for n, v in self._items.items() if n != name}
        self._notify(KeyChange("delete", name, old))

    def _notify(self, change: KeyChange[T]) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                log.exception("listener of %s failed on %s", self.prefix, change)
