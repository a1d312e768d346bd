"""Making aetcd clients from an EtcdConfig (endpoints, TLS, user/password), and retry backoff.

aetcd opens only plaintext gRPC channels, so `_TLSClient` opens the channel itself when TLS is
configured; everything else (auth token, stubs, watcher) is aetcd's.

Failure policy: callers never repair a client after an error. They drop it and ask the connector
for a new one, which also moves to the next endpoint and re-authenticates (simple auth tokens do
not survive an etcd restart).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from pathlib import Path

import aetcd
import grpc
from aetcd import rpc
from aetcd import watcher as aetcd_watcher

from cluster.config import EtcdConfig, parse_endpoint

log = logging.getLogger(__name__)

# Keepalive pings find a dead or frozen etcd under an open watch stream. etcd's server accepts
# pings at most every 5 s (--grpc-keepalive-min-time) and only while a stream is open, so pings
# without calls stay off.
_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
}


class EtcdConfigError(ValueError):
    """The etcd section cannot be used as given (no endpoint, unreadable cert file...)."""


class EtcdUnavailableError(RuntimeError):
    """etcd did not answer (down, unreachable, or refused the credentials)."""


class _TLSClient(aetcd.Client):
    """aetcd.Client over a TLS channel; auth and stubs set up as aetcd's own connect() does."""

    def __init__(self, *args, credentials: grpc.ChannelCredentials, **kwargs):
        super().__init__(*args, **kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(target, self._credentials, options=list(self._options.items()))
            if self._username is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                try:
                    resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
                except rpc.AioRpcError as e:
                    raise aetcd.ClientError(f"etcd authentication as {self._username!r} failed: {e.details()}") from e
                self.metadata = (("token", resp.token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd_watcher.Watcher(
                rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False


class EtcdConnector:
    """Makes aetcd clients for one EtcdConfig. Each new client uses the next endpoint in turn, so
    replacing a failed client fails over across a multi-member cluster.

    request_timeout_s bounds every unary call (get, put, txn, lease); watches are not bounded.
    """

    def __init__(self, config: EtcdConfig, *, request_timeout_s: float = 5.0):
        if not config.endpoints:
            raise EtcdConfigError(
                "etcd.endpoints is empty: set it to your etcd cluster (['host:2379', ...]), "
                "or let `pdserve up` start a local etcd"
            )
        self.config = config
        self.request_timeout_s = request_timeout_s
        self._endpoints = [parse_endpoint(e) for e in config.endpoints]
        self._next_endpoint = itertools.cycle(range(len(self._endpoints)))
        self._credentials = _channel_credentials(config) if config.use_tls else None
        self._password = config.password.get_secret_value() if config.password is not None else None
        self.last_endpoint: str | None = None

    @property
    def endpoints(self) -> list[str]:
        return [f"{host}:{port}" for host, port in self._endpoints]

    def new_client(self) -> aetcd.Client:
        host, port = self._endpoints[next(self._next_endpoint)]
        self.last_endpoint = f"{host}:{port}"
        kwargs = dict(
            host=host,
            port=port,
            username=self.config.user,
            password=self._password,
            timeout=self.request_timeout_s,
            options=dict(_CHANNEL_OPTIONS),
        )
        if self._credentials is not None:
            return _TLSClient(credentials=self._credentials, **kwargs)
        return aetcd.Client(**kwargs)


async def close_quietly(client: aetcd.Client | None, timeout_s: float = 2.0) -> None:
    """Close a client that may already be broken; never raises (except cancellation)."""
    if client is None:
        return
    try:
        await asyncio.wait_for(client.close(), timeout_s)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a broken channel may fail to close; it is dropped either way
        log.debug("closing etcd client failed: %r", e)


def _channel_credentials(config: EtcdConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.ca_cert, "etcd.ca_cert"),
        private_key=_read(config.client_key, "etcd.client_key"),
        certificate_chain=_read(config.client_cert, "etcd.client_cert"),
    )


def _read(path: Path | None, key: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise EtcdConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from e


class Backoff:
    """Exponential backoff with jitter: initial_s, x factor, capped at max_s; reset() on success."""

    def __init__(self, initial_s: float = 0.2, max_s: float = 2.0, factor: float = 2.0, jitter: float = 0.2):
        if not 0 < initial_s <= max_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {initial_s}, {max_s}")
        self.initial_s = initial_s
        self.max_s = max_s
        self.factor = factor
        self.jitter = jitter
        self.num_failures = 0

    def next_delay_s(self) -> float:
        delay = min(self.max_s, self.initial_s * self.factor**self.num_failures)
        self.num_failures += 1
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.num_failures = 0
