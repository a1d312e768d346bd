"""Fixtures for registry tests: a real etcd process per test module (free loopback ports), worker
infos, a cuttable TCP proxy (a real network fault between one client and etcd), TLS certificates
and etcd user/role set-up."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aetcd
import pytest
from aetcd import rpc
from aetcd.utils import prefix_range_end
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cluster.etcd_server import LocalEtcd
from workers.protocol import Role, WorkerInfo


@pytest.fixture(scope="module")
def local_etcd(tmp_path_factory) -> LocalEtcd:
    """One etcd per test module; tests keep apart by using their own cluster_name."""
    etcd = LocalEtcd(tmp_path_factory.mktemp("etcd")).start()
    yield etcd
    etcd.stop()


@pytest.fixture
def cluster_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def make_worker_info(worker_id: str, role: Role | str = Role.PREFILL, **fields) -> WorkerInfo:
    values = dict(
        worker_id=worker_id,
        role=Role(role),
        actor_name=f"pdserve-{Role(role).value}-{worker_id}",
        address="127.0.0.1",
        model="tiny",
        kv_capacity_blocks=64,
        compat_hash="compat-1",
        started_at=time.time(),
    )
    values.update(fields)
    return WorkerInfo(**values)


async def eventually(predicate, timeout_s: float = 15.0, interval_s: float = 0.05, what: str = "condition"):
    """Polls predicate() until true; fails with `what` after timeout_s (a liveness bound, not a speed check)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for: {what}")
        await asyncio.sleep(interval_s)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; cut() drops every connection and refuses new ones
    (the target stays up), restore() listens again on the same port."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def restore(self) -> None:
        await self.start()

    async def _handle(self, client_reader, client_writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers |= {client_writer, upstream_writer}

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                writer.transport.abort()
                self._writers.discard(writer)

        await asyncio.gather(pipe(client_reader, upstream_writer), pipe(upstream_reader, client_writer))


@pytest.fixture
async def tcp_proxy_to(request):
    """tcp_proxy_to(etcd) -> a started TcpProxy in front of that etcd's client port."""
    proxies: list[TcpProxy] = []

    async def make(etcd: LocalEtcd) -> TcpProxy:
        proxy = TcpProxy(etcd.host, etcd.client_port)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        if proxy._server is not None and proxy._server.is_serving():
            await proxy.cut()


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path  # signed by another CA: etcd must refuse it
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, key, issuer_name: x509.Name, issuer_key, *, is_ca: bool, usages=(), sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> TLSFiles:
    """A CA, a server cert for 127.0.0.1 (also usable as a client cert, for etcd's health probe),
    a client cert, and a client cert from a rogue CA."""
    d = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("pdserve-test-ca", ca_key, _name("pdserve-test-ca"), ca_key, is_ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        "etcd-server", server_key, ca.subject, ca_key, is_ca=False,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")),
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue("pdserve-worker", client_key, ca.subject, ca_key, is_ca=False,
                    usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _issue("intruder", rogue_key, _name("rogue-ca"), rogue_ca_key, is_ca=False,
                   usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))
    return TLSFiles(
        ca_cert=_write(d / "ca.pem", cert=ca),
        server_cert=_write(d / "server.pem", cert=server),
        server_key=_write(d / "server-key.pem", key=server_key),
        client_cert=_write(d / "client.pem", cert=client),
        client_key=_write(d / "client-key.pem", key=client_key),
        rogue_client_cert=_write(d / "rogue.pem", cert=rogue),
        rogue_client_key=_write(d / "rogue-key.pem", key=rogue_key),
    )


# --- etcd auth ---------------------------------------------------------------------------------


async def enable_etcd_auth(etcd: LocalEtcd, *, root_password: str, user: str, password: str, key_prefix: str) -> None:
    """Creates root, and `user` with read-write on key_prefix only, then turns auth on (etcd 3.4
    requires a root user holding the root role before `auth enable`)."""
    async with aetcd.Client(host=etcd.host, port=etcd.client_port, timeout=5) as client:
        auth = rpc.AuthStub(client.channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=root_password))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        role = f"{user}-role"
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name=role))
        prefix = key_prefix.encode()
        permission = rpc.Permission(permType=rpc.Permission.READWRITE, key=prefix,
                                    range_end=prefix_range_end(prefix))
        await auth.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name=role, perm=permission))
        await auth.UserAdd(rpc.AuthUserAddRequest(name=user, password=password))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role=role))
        await auth.AuthEnable(rpc.AuthEnableRequest())
