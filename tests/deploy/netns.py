"""TwoHosts: two network + PID namespaces joined by a veth pair, standing in for two machines.

    host A (netns pds<tag>a, own PID ns)          host B (netns pds<tag>b, own PID ns)
    pdv<tag>a  10.200.0.1/24  <---- veth ---->  pdv<tag>b  10.200.0.2/24
    lo up (127.0.0.1 is A's own)                 lo up (127.0.0.1 is B's own)
    default route: dev pdv<tag>a                 default route: dev pdv<tag>b

Each host has its own interfaces, addresses, ports, loopback and process table: a server bound to
A's address is reached from B only across the veth, and `ps` on one host does not show the other
host's processes (Ray finds "its" raylets by scanning processes; a `ray stop` on one host must not
reach the other, nor anything outside the test). Filesystems are shared, as with an NFS home.
Processes started through a host get UCX_NET_DEVICES = its veth and UCX_TLS = tcp (why: Host.env).

Invariants: a host is an init process (a reaper, PID 1 of the host's PID namespace) that
every command joins with nsenter; `down()` ends the processes it started, then kills each init,
which makes the kernel kill everything left in that PID namespace, then deletes both network
namespaces, which removes the veth pair with them.
Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), iproute2 and util-linux (unshare, nsenter). Works from
inside another network namespace (tests/run-isolated.sh runs the suite in one): `ip netns add`
there registers the new namespaces under /run/netns of that shell's mount namespace, which is all
`ip netns exec` needs.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
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
            "the two-host tests build network and PID namespaces and a veth pair, which needs root "
            "(CAP_NET_ADMIN and CAP_SYS_ADMIN): run them as root, e.g. `sudo make test` or "
            "`sudo tests/run-isolated.sh .venv/bin/python -m pytest tests/deploy`"
        )
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            raise NetnsUnavailableError(f"`{tool}` not found: install {package} (`apt-get install {package}`)")


@dataclass
class Host:
    """One side of the pair: its namespaces (through its init process), veth and address."""

    label: str
    netns: str
    device: str
    address: str
    init: subprocess.Popen | None = field(default=None, repr=False)
    init_pid: int | None = None  # PID (in our namespace) of the host's PID-1 process
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        if self.init_pid is None:
            raise RuntimeError(f"host {self.label} is not up")
        return ["nsenter", f"--target={self.init_pid}", "--net", "--pid", "--mount", f"--wd={os.getcwd()}", "--", *argv]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["UCX_NET_DEVICES"] = self.device
        # The two hosts share one kernel: left to itself UCX moves the bytes through shared memory
        # between them (seen: an 8 MiB READ put 1.2 KB on the veth). Separate machines have no
        # such path, so the harness allows only TCP, over the veth.
        env["UCX_TLS"] = "tcp"
        env.update(extra or {})
        return env

    def run(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout_s: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Runs argv on this host to completion; raises with its output when check and it fails."""
        done = subprocess.run(self.command(argv), env=self.env(env), capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"host {self.label}: {' '.join(argv)} exited {done.returncode}\n"
                f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
            )
        return done

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Starts argv on this host in its own session (so down() can end its whole group)."""
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
    """`with TwoHosts() as (a, b): ...` builds both hosts, yields them, tears everything down."""

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
                # A default route over the veth, as a real host has: Ray finds "my address" by
                # routing towards a public IP and otherwise falls back to the hostname's address,
                # which is not this host's. Nothing lies beyond the peer.
                _ip("-n", host.netns, "route", "add", "default", "dev", host.device)
                _start_init(host)
        except BaseException:
            self.down()
            raise
        return self.a, self.b

    def down(self) -> None:
        for host in (self.a, self.b):
            for proc in host._procs:
                _end_group(proc)
            host._procs.clear()
            if host.init is not None:
                # PID 1 of the host's namespace: when it dies the kernel kills the rest of it.
                host.init.kill()
                host.init.wait(timeout=10)
                host.init, host.init_pid = None, None
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


# PID 1 of a host: reaps every orphan (daemons such as raylet are reparented to it), as a real
# init does; a non-reaping PID 1 would leave them as zombies that still look alive.
_INIT_CODE = """
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""


def _start_init(host: Host, timeout_s: float = 10.0) -> None:
    """The host's PID-1 process, in its network namespace, with its own PID namespace and /proc."""
    host.init = subprocess.Popen(
        ["ip", "netns", "exec", host.netns, "unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-c", _INIT_CODE],
        start_new_session=True,
    )
    # `ip netns exec` execs unshare (same PID); unshare forks the namespace's PID 1.
    children = Path(f"/proc/{host.init.pid}/task/{host.init.pid}/children")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = children.read_text().split() if children.exists() else []
        if pids and _INIT_CODE.encode() in Path(f"/proc/{pids[0]}/cmdline").read_bytes():
            host.init_pid = int(pids[0])
            return
        if host.init.poll() is not None:
            break
        time.sleep(0.02)
    raise NetnsUnavailableError(f"host {host.label}: could not start its PID namespace (unshare --pid --mount-proc)")


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
    """Ends anything still inside one of our network namespaces (all of it ours: the names are)."""
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
