"""LeaseTable: the prefill side's record of which blocks are pinned for which reader, until when.

    pin(request_id, block_ids, ttl_s)   -> expires_at (unix time, goes into the KVHandle)
    renew(request_id)                   -> new expires_at       (reader still waiting)
    release(request_id)                 -> block_ids            (reader done: caller frees them)
    expiry (reaper thread, or a late release/renew noticing it)  -> on_expired(request_id)

Exactly one of release() returning normally or on_expired(request_id) happens per pin, and either
way the caller (the prefill worker) frees the blocks in its engine; this table never touches the
engine. A release() or renew() after expiry raises LeaseExpiredError: the reader may have read
blocks that were already reused, so it must discard what it read. Because a successful release
happens after the reader's READ completed, "release succeeded" implies "the blocks stayed pinned for
the whole READ".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kv_transfer.errors import LeaseExpiredError, UnknownLeaseError
from kv_transfer.metrics import TransferMetrics

log = logging.getLogger(__name__)

_REMEMBER_EXPIRED = 10_000  # expired ids kept to tell "expired" from "never pinned" on a late release


@dataclass
class _Lease:
    block_ids: tuple[int, ...]
    ttl_s: float
    deadline: float  # monotonic


class LeaseTable:
    def __init__(
        self,
        on_expired: Callable[[str], None],
        *,
        metrics: TransferMetrics | None = None,
        reap_interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``on_expired(request_id)`` runs on the reaper thread (or on the thread of a late
        release/renew); it must free the request's blocks in the engine and must not block long."""
        self._on_expired = on_expired
        self._metrics = metrics
        self._reap_interval_s = reap_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, _Lease] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._reap_loop, name="kv-lease-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- the table -----------------------------------------------------------------------------
    def pin(self, request_id: str, block_ids: list[int] | tuple[int, ...], ttl_s: float) -> float:
        """Pin ``block_ids`` for ``ttl_s`` seconds; returns the expiry as unix time."""
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        with self._lock:
            if request_id in self._leases:
                raise ValueError(f"request {request_id!r} already holds a lease")
            self._expired.pop(request_id, None)
            self._leases[request_id] = _Lease(tuple(block_ids), ttl_s, self._clock() + ttl_s)
            self._publish_pinned()
        return time.time() + ttl_s

    def renew(self, request_id: str, ttl_s: float | None = None) -> float:
        """Push the expiry to now + ttl_s (default: the pinned ttl); returns it as unix time."""
        with self._lock:
            lease = self._live_lease(request_id)
            if lease is not None:
                ttl = lease.ttl_s if ttl_s is None else ttl_s
                lease.deadline = self._clock() + ttl
                return time.time() + ttl
        self._expire_now(request_id)

    def release(self, request_id: str) -> tuple[int, ...]:
        """The reader is done: drop the pin and return the block ids for the caller to free.
        Raises LeaseExpiredError (after reporting the expiry) or UnknownLeaseError."""
        with self._lock:
            lease = self._live_lease(request_id)
            if lease is not None:
                del self._leases[request_id]
                self._publish_pinned()
                return lease.block_ids
        self._expire_now(request_id)

    def reap(self) -> list[str]:
        """Expire every lease past its deadline; report each through on_expired."""
        now = self._clock()
        with self._lock:
            expired = [rid for rid, lease in self._leases.items() if lease.deadline <= now]
            for rid in expired:
                self._forget(rid)
        for rid in expired:
            self._report(rid)
        return expired

    @property
    def num_leases(self) -> int:
        with self._lock:
            return len(self._leases)

    @property
    def num_pinned_blocks(self) -> int:
        with self._lock:
            return sum(len(lease.block_ids) for lease in self._leases.values())

    def is_pinned(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._leases

    # -- internals -----------------------------------------------------------------------------
    def _live_lease(self, request_id: str) -> _Lease | None:
        """The lease if it is held and not past its deadline (caller holds the lock)."""
        lease = self._leases.get(request_id)
        if lease is not None and lease.deadline > self._clock():
            return lease
        return None

    def _expire_now(self, request_id: str):
        """A release/renew found no live lease: expire it here if the reaper has not, then raise."""
        with self._lock:
            if request_id in self._leases:  # past its deadline, not reaped yet: expire it here
                self._forget(request_id)
                newly_expired = True
            elif request_id in self._expired:
                newly_expired = False
            else:
                raise UnknownLeaseError(f"no lease for request {request_id!r} (never pinned, or already released)",
                                        request_id=request_id)
        if newly_expired:
            self._report(request_id)
        raise LeaseExpiredError(f"the lease on request {request_id!r}'s KV blocks expired before its release: "
                                "the blocks may have been reused, discard what was read", request_id=request_id)

    def _forget(self, request_id: str) -> None:
        del self._leases[request_id]
        self._expired[request_id] = None
        while len(self._expired) > _REMEMBER_EXPIRED:
            self._expired.popitem(last=False)
        self._publish_pinned()

    def _report(self, request_id: str) -> None:
        log.warning("KV lease of request %s expired before its release", request_id)
        if self._metrics is not None:
            self._metrics.lease_expired()
        try:
            self._on_expired(request_id)
        except Exception:  # the reaper must survive a failing callback; the failure is logged
            log.exception("on_expired(%s) failed", request_id)

    def _publish_pinned(self) -> None:
        if self._metrics is not None:
            self._metrics.set_pinned_blocks(sum(len(lease.block_ids) for lease in self._leases.values()))

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._reap_interval_s):
            self.reap()
