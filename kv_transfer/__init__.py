"""KV transfer between engines in different processes: see transceiver.py for the contract.

Imports are lazy: workers.protocol imports kv_transfer.layout, and the transceivers import
workers.protocol, so this package's __init__ must not import them eagerly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kv_transfer.config import TransferConfig
    from kv_transfer.transceiver import KVTransceiver


def make_transceiver(config: "TransferConfig", kv_cache, worker_id: str, *, host: str | None = None,
                     registry=None) -> "KVTransceiver":
    """The transceiver ``config.backend`` names, registered as a listener of ``kv_cache``.

    nixl: NixlTransceiver; if NIXL cannot load, BackendUnavailableError says what to install.
    tcp:  TcpTransceiver, serving on ``host`` (default: this node's IP when Ray is up, else
          127.0.0.1). Never chosen unless configured.
    ``registry``: a prometheus CollectorRegistry (default: the process-wide one).
    """
    from kv_transfer.metrics import TransferMetrics

    metrics = TransferMetrics(worker_id, config.backend, registry)
    if config.backend == "nixl":
        from kv_transfer.nixl_transceiver import NixlTransceiver

        return NixlTransceiver(worker_id, kv_cache, metrics=metrics, num_threads=config.nixl_num_threads,
                               cuda_ipc=config.cuda_ipc,
                               progress_delay_us=config.progress_delay_us(kv_cache.device.type))
    if config.backend == "tcp":
        from kv_transfer.tcp_transceiver import TcpTransceiver

        return TcpTransceiver(worker_id, kv_cache, host=host or _node_ip(), metrics=metrics)
    raise ValueError(f"unknown transfer.backend {config.backend!r} (nixl | tcp)")


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:
        pass
    return "127.0.0.1"
