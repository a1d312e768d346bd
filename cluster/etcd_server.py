"""LocalEtcd: a real single-member etcd 3.4 process for `pdserve up` and tests.

Its data lives under a run directory, so the same instance can be stopped and started again on the
same data (keys and leases survive; used by outage tests). Client and peer ports are picked free on
127.0.0.1 at the first start and kept across restarts, so clients reconnect to the same endpoint.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import httpx

from cluster.config import EtcdConfig


class EtcdNotInstalledError(RuntimeError):
    pass


class EtcdStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class EtcdServerTLS:
    """Server-side TLS: the server cert must name 127.0.0.1 (SAN IP) for local clients."""

    cert_file: Path
    key_file: Path
    trusted_ca_file: Path
    client_cert_auth: bool = True  # clients must present a cert signed by trusted_ca_file
    # What the /health probe presents when client_cert_auth is on; default: the server's own pair,
    # which works when that cert also carries the clientAuth extended key usage.
    probe_cert_file: Path | None = None
    probe_key_file: Path | None = None


def find_etcd_binary() -> str:
    for candidate in ("/usr/bin/etcd", shutil.which("etcd")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise EtcdNotInstalledError(
        "etcd server not found (looked at /usr/bin/etcd and PATH): install it with "
        "`apt-get install etcd-server` (or `make system-deps`), or set etcd.endpoints in the config "
        "to an existing etcd v3 cluster"
    )


def pick_free_port(host: str = "127.0.0.1", avoid: tuple[int, ...] = ()) -> int:
    """A port the kernel calls free on ``host`` now, not one of ``avoid``. Ports picked one after
    the other may repeat (each socket is closed before the next bind: the kernel may hand the
    same port out again), so a caller wanting several passes those it already holds."""
    held = []
    try:
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)  # kept bound until a port outside ``avoid`` comes up: never offered twice
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in avoid:
                return port
    finally:
        for s in held:
            s.close()


_running: "weakref.WeakSet[LocalEtcd]" = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for etcd in list(_running):
        etcd.stop()


class LocalEtcd:
    """One etcd member on 127.0.0.1. `start()` blocks until /health answers; `stop()` is idempotent.

    Invariant: `data_dir` and the two ports never change for the life of the object, so a restart
    resumes the same cluster (same member id, keys, leases, revision).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        name: str = "pdserve-etcd",
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        tls: EtcdServerTLS | None = None,
        startup_timeout_s: float = 20.0,
    ):
        self.run_dir = Path(run_dir)
        self.name = name
        self.host = host
        self.tls = tls
        self.startup_timeout_s = startup_timeout_s
        self.data_dir = self.run_dir / f"{name}.data"
        self.log_path = self.run_dir / f"{name}.log"
        self._binary = find_etcd_binary()
        self.client_port = client_port or pick_free_port(host, avoid=(peer_port,) if peer_port else ())
        self.peer_port = peer_port or pick_free_port(host, avoid=(self.client_port,))
        if self.peer_port == self.client_port:
            raise ValueError("etcd client and peer ports must differ")
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def endpoint(self) -> str:
        """host:port of the client API (what EtcdConfig.endpoints takes)."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.endpoint}"

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running else None

    def etcd_config(self, **fields) -> EtcdConfig:
        """An EtcdConfig pointing at this server (extra fields: lease_ttl_s, certs, user...)."""
        return EtcdConfig(endpoints=[self.endpoint], **fields)

    def _command(self) -> list[str]:
        peer_url = f"http://{self.host}:{self.peer_port}"
        cmd = [
            self._binary,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.name}={peer_url}",
            "--initial-cluster-state=new",  # ignored when data_dir already holds a member
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls:
            cmd += [
                f"--cert-file={self.tls.cert_file}",
                f"--key-file={self.tls.key_file}",
                f"--trusted-ca-file={self.tls.trusted_ca_file}",
            ]
            if self.tls.client_cert_auth:
                cmd.append("--client-cert-auth")
        return cmd

    def start(self) -> "LocalEtcd":
        if self.is_running:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        # ETCD_* variables from the caller's environment would silently override our flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self._proc = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, not etcd: we stop it cleanly
        )
        _running.add(self)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client_kwargs = {}
        if self.tls:
            ssl_context = ssl.create_default_context(cafile=str(self.tls.trusted_ca_file))
            if self.tls.client_cert_auth:
                ssl_context.load_cert_chain(
                    str(self.tls.probe_cert_file or self.tls.cert_file),
                    str(self.tls.probe_key_file or self.tls.key_file),
                )
            client_kwargs["verify"] = ssl_context
        last_error = "no answer yet"
        with httpx.Client(timeout=1.0, **client_kwargs) as http:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise EtcdStartError(
                        f"etcd exited with code {self._proc.returncode} while starting; "
                        f"last log lines ({self.log_path}):\n{self._log_tail()}"
                    )
                try:
                    resp = http.get(f"{self.client_url}/health")
                    if resp.status_code == 200 and resp.json().get("health") == "true":
                        return
                    last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                except (httpx.HTTPError, ValueError) as e:
                    last_error = repr(e)
                time.sleep(0.05)
        raise EtcdStartError(
            f"etcd at {self.client_url} not healthy after {self.startup_timeout_s:.0f} s "
            f"({last_error}); log tail ({self.log_path}):\n{self._log_tail()}"
        )

    def _log_tail(self, num_lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after timeout_s. Data stays on disk for a later start()."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _running.discard(self)

    def __enter__(self) -> "LocalEtcd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"LocalEtcd({self.client_url}, {state}, data={self.data_dir})"

