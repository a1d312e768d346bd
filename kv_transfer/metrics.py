"""Prometheus metrics of KV transfers, one labelled child set per transceiver.

Metric families are created once per registry (default: prometheus_client.REGISTRY) and every
transceiver in the process uses its own ``worker_id`` label, so several transceivers in one process
(tests, a colocated prefill+decode pair) never clash on registration.

Plain running totals are kept beside the Prometheus objects for ``counters()``, the dict a worker
folds into its WorkerCounters for the router.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class _Families:
    bytes: Counter
    transfers: Counter
    seconds: Histogram
    failures: Counter
    leases_expired: Counter
    pinned_blocks: Gauge


# keyed by the registry itself, weakly: keyed by id(), a registry made after an earlier one was
# collected could get its address and then be handed the dead registry's families (its own stayed
# empty: seen once in the suite as an empty /metrics text)
_families_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def _families(registry: CollectorRegistry) -> _Families:
    with _families_lock:
        fam = _families_by_registry.get(registry)
        if fam is None:
            wb = ["worker_id", "backend"]
            fam = _Families(
                bytes=Counter("pdserve_kv_transfer_bytes", "KV bytes moved by transfers that completed", wb + ["direction"], registry=registry),
                transfers=Counter("pdserve_kv_transfers", "KV transfers that completed", wb + ["direction"], registry=registry),
                seconds=Histogram("pdserve_kv_transfer_seconds", "Duration of one request's KV transfer (post to completion)",
                                  wb + ["direction"], buckets=_SECONDS_BUCKETS, registry=registry),
                failures=Counter("pdserve_kv_transfer_failures", "Failed KV transfers by error kind", wb + ["error"], registry=registry),
                leases_expired=Counter("pdserve_kv_leases_expired", "Pinned KV handles freed because their lease ran out",
                                       ["worker_id"], registry=registry),
                pinned_blocks=Gauge("pdserve_kv_pinned_blocks", "KV blocks pinned for readers under leases",
                                    ["worker_id"], registry=registry),
            )
            _families_by_registry[registry] = fam
        return fam


class TransferMetrics:
    """One transceiver's metrics. Thread-safe (transfers may run on several threads)."""

    def __init__(self, worker_id: str, backend: str, registry: CollectorRegistry | None = None):
        self.worker_id = worker_id
        self.backend = backend
        self._fam = _families(registry if registry is not None else REGISTRY)
        self._lock = threading.Lock()
        self._totals = {"num_transfers": 0, "num_transfer_failures": 0, "transfer_bytes": 0, "transfer_seconds": 0.0}
        self._done: dict[str, tuple] = {}  # direction -> its (bytes, transfers, seconds) children: a label
        # lookup per transfer costs more than the rest of a small same-node READ's bookkeeping

    def transfer_done(self, num_bytes: int, seconds: float, direction: str = "read") -> None:
        children = self._done.get(direction)
        if children is None:
            labels = (self.worker_id, self.backend, direction)
            children = self._done[direction] = (self._fam.bytes.labels(*labels), self._fam.transfers.labels(*labels),
                                                self._fam.seconds.labels(*labels))
        children[0].inc(num_bytes)
        children[1].inc()
        children[2].observe(seconds)
        with self._lock:
            self._totals["num_transfers"] += 1
            self._totals["transfer_bytes"] += num_bytes
            self._totals["transfer_seconds"] += seconds

    def transfer_failed(self, error_kind: str) -> None:
        self._fam.failures.labels(self.worker_id, self.backend, error_kind).inc()
        with self._lock:
            self._totals["num_transfer_failures"] += 1

    def lease_expired(self) -> None:
        self._fam.leases_expired.labels(self.worker_id).inc()

    def set_pinned_blocks(self, num_blocks: int) -> None:
        self._fam.pinned_blocks.labels(self.worker_id).set(num_blocks)

    def counters(self) -> dict[str, float]:
        """Totals named like WorkerCounters' fields: num_transfers, num_transfer_failures,
        transfer_bytes, transfer_seconds."""
        with self._lock:
            return dict(self._totals)
