"""TwoHosts: two network namespaces joined by a veth pair, standing in for two machines.

    host A (netns pds<pid>a)                      host B (netns pds<pid>b)
    pdv<pid>a  10.200.0.1/24  <---- veth ---->  pdv<pid>b  10.200.0.2/24
    lo up (127.0.0.1 is A's own)                 lo up (127.0.0.1 is B's own)

Each host has its own interfaces, addresses, ports and loopback: a server bound to A's address is
reached from B only across the veth. Processes started through a host run inside its namespace
with UCX_NET_DEVICES set to that host's veth, so UCX traffic crosses the veth, never `lo`.

Invariants: every process started through `Host.run/popen` is tracked and ended by `down()`;
`down()` also ends whatever is left inside the two namespaces (all of it started by us, as the
names are ours alone), then deletes both namespaces, which removes the veth pair with them.
Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and iproute2; works from inside another network
namespace too (tests/run-isolated.sh runs the suite in one).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

ADDRESS_A = "10.200.0.1"
ADDRESS_B = "10.200.0.2"
PREFIX_LEN = 24
_instances = itertools.count()


class NetnsUnavailableError(RuntimeError):
    """The two-host harness cannot be built here; the message says what is missing."""


def require_netns_support() -> None:
    if os.geteuid() != 0:
        raise NetnsUnavailableError(
            "the two-host tests build network namespaces and a veth pair, which needs root "
            "(CAP_NET_ADMIN and CAP_SYS_ADMIN): run them as root, e.g. `sudo make test` or "
            "`sudo tests/run-isolated.sh .venv/bin/python -m pytest tests/deploy`"
        )
    if shutil.which("ip") is None:
        raise NetnsUnavailableError("`ip` not found: install iproute2 (`apt-get install iproute2`, or `make system-deps`)")


@dataclass
class Host:
    """One side of the pair: a namespace, its veth and its address."""

    label: str
    netns: str
    device: str
    address: str
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["UCX_NET_DEVICES"] = self.device
        # The two namespaces share one kernel: left to itself UCX moves the bytes through shared
        # memory / CMA between them (seen: an 8 MiB READ put 1.2 KB on the veth). Separate
        # machines have no such path, so the harness allows only TCP, over the veth.
        env["UCX_TLS"] = "tcp"
        env.update(extra or {})
        return env

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Runs argv inside this host to completion; raises with its output when check and it fails."""
        done = subprocess.run(
            self.command(argv), env=self.env(env), capture_output=True, text=True, timeout=timeout_s
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"host {self.label}: {' '.join(argv)} exited {done.returncode}\n"
                f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
            )
        return done

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Starts argv inside this host in its own session (so down() can end its whole group)."""
        proc = subprocess.Popen(self.command(argv), env=self.env(env), start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def link_bytes(self) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of this host's veth, from the kernel's counters."""
        out = subprocess.run(
            ["ip", "-n", self.netns, "-s", "-j", "link", "show", "dev", self.device],
            capture_output=True, text=True, check=True,
        ).stdout
        stats = json.loads(out)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]


class TwoHosts:
    """Context manager: `with TwoHosts() as (a, b): ...` builds, yields both hosts, tears down."""

    def __init__(self) -> None:
        # Unique per process and instance; interface names must stay within 15 characters.
        tag = f"{os.getpid()}{next(_instances)}"
        self.a = Host("A", f"pds{tag}a", f"pdv{tag}a", ADDRESS_A)
        self.b = Host("B", f"pds{tag}b", f"pdv{tag}b", ADDRESS_B)
        self._created: list[str] = []

    def up(self) -> tuple[Host, Host]:
        require_netns_support()
        try:
            for host in (self.a, self.b):
                _ip("netns", "add", host.netns)
                self._created.append(host.netns)
            _ip("link", "add", self.a.device, "type", "veth", "peer", "name", self.b.device)
            for host in (self.a, self.b):
                _ip("link", "set", host.device, "netns", host.netns)
                _ip("-n", host.netns, "addr", "add", f"{host.address}/{PREFIX_LEN}", "dev", host.device)
                _ip("-n", host.netns, "link", "set", host.device, "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self.a, self.b

    def down(self) -> None:
        for host in (self.a, self.b):
            for proc in host._procs:
                _end_group(proc)
            host._procs.clear()
        for netns in self._created:
            _end_namespace_processes(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._created.clear()
        # The veth lives in the namespaces; if up() failed before moving it, remove it here.
        subprocess.run(["ip", "link", "del", self.a.device], capture_output=True)

    def namespaces_exist(self) -> bool:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        names = {line.split()[0] for line in listed.splitlines() if line.strip()}
        return bool(names & {self.a.netns, self.b.netns})

    def __enter__(self) -> tuple[Host, Host]:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsUnavailableError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _end_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace_s)


def _end_namespace_processes(netns: str, grace_s: float = 5.0) -> None:
    """Ends what is still running inside one of our namespaces (daemons such as `ray start`'s)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _namespace_pids(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _namespace_pids(netns):
            time.sleep(0.1)


def _namespace_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
