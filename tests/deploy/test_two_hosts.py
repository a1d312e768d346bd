"""The two-host harness (netns.TwoHosts) works for real: each host has only its own address, etcd
on A is reached from B through pdserve's own etcd client, the `ray up` head commands serve etcd
to other hosts, and a NIXL READ moves its bytes over UCX across the veth (not loopback).
Needs root; without it every test here fails saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from manifests import PDSERVE_CLUSTER_CONFIG, RAY_UP_CONFIGS, load_yaml
from netns import ADDRESS_A, NetnsUnavailableError, TwoHosts

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

HERE = Path(__file__).resolve().parent
PY = sys.executable


@pytest.fixture(scope="module")
def pair():
    pair = TwoHosts()
    try:
        pair.up()
    except NetnsUnavailableError as e:
        pytest.fail(str(e))
    yield pair
    pair.down()


def probe(host, config_file: Path, *args: str, check: bool = True) -> dict:
    done = host.run([PY, str(HERE / "etcd_probe.py"), str(config_file), *args], check=check, timeout_s=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def etcd_config(tmp_path: Path, endpoint: str) -> Path:
    path = tmp_path / f"etcd-{endpoint.replace(':', '-')}.yaml"
    path.write_text(yaml.safe_dump({"etcd": {"endpoints": [endpoint]}}))
    return path


def test_each_host_sees_only_its_own_address(pair):
    for host, other in ((pair.a, pair.b), (pair.b, pair.a)):
        addrs = json.loads(host.run(["ip", "-j", "addr", "show"]).stdout)
        mine = {(link["ifname"], a["local"]) for link in addrs for a in link.get("addr_info", []) if a["family"] == "inet"}
        assert mine == {("lo", "127.0.0.1"), (host.device, host.address)}
        assert other.address not in {ip for _, ip in mine}


def test_teardown_removes_namespaces_and_veth():
    extra = TwoHosts()
    try:
        extra.up()
    except NetnsUnavailableError as e:
        pytest.fail(str(e))
    sleeper = extra.a.popen(["sleep", "600"])
    assert extra.namespaces_exist()
    extra.down()
    assert sleeper.poll() is not None
    assert not extra.namespaces_exist()
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert extra.a.device not in links and extra.b.device not in links


def test_etcd_on_a_is_reached_from_b_and_only_across_the_veth(pair, tmp_path):
    etcd = pair.a.popen(
        [
            "/usr/bin/etcd", "--name", "host-a", "--data-dir", str(tmp_path / "etcd"),
            "--listen-client-urls", f"http://{ADDRESS_A}:2379", "--advertise-client-urls", f"http://{ADDRESS_A}:2379",
            "--listen-peer-urls", f"http://{ADDRESS_A}:2380", "--initial-advertise-peer-urls", f"http://{ADDRESS_A}:2380",
            "--initial-cluster", f"host-a=http://{ADDRESS_A}:2380",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        at_a = etcd_config(tmp_path, f"{ADDRESS_A}:2379")
        put = probe(pair.b, at_a, "put", "/pdserve/netns-test", "from-b", "30")
        assert put["ok"], put
        got = probe(pair.a, at_a, "get", "/pdserve/netns-test")
        assert got["value"] == "from-b"
        # B's own loopback has no etcd: B reached A over the veth, not through a shared port.
        local_b = probe(pair.b, etcd_config(tmp_path, "127.0.0.1:2379"), "status", check=False)
        assert not local_b["ok"] and "Connect" in local_b["error"]
    finally:
        etcd.terminate()
        etcd.wait(timeout=10)


def test_ray_up_head_commands_serve_etcd_to_other_hosts(pair, tmp_path):
    """aws.yaml's head start commands, run for real on host A (etcd binary: this machine's), give
    a rendered config whose endpoint host B reaches; running them again replaces that etcd."""
    head_commands = load_yaml(RAY_UP_CONFIGS[0])["head_start_ray_commands"]
    etcd_start, render = head_commands[0], head_commands[1]
    home = tmp_path / "home"
    (home / "etcd").mkdir(parents=True)
    (home / "etcd" / "etcd").symlink_to("/usr/bin/etcd")
    (home / "pdserve" / "deploy" / "ray").mkdir(parents=True)
    (home / "pdserve" / "deploy" / "ray" / PDSERVE_CLUSTER_CONFIG.name).write_text(PDSERVE_CLUSTER_CONFIG.read_text())
    env = {"HOME": str(home)}
    try:
        for attempt in ("first start", "restart"):
            pair.a.run(["bash", "-c", etcd_start], env=env)
            pair.a.run(["bash", "-c", render], env=env)
            rendered = home / "pdserve-config.yaml"
            assert load_config(rendered).etcd.endpoints == [f"{ADDRESS_A}:2379"], attempt
            put = probe(pair.b, rendered, "put", "/pdserve/ray-up-test", attempt, "30")
            assert put["ok"], (attempt, put)
            assert probe(pair.b, rendered, "get", "/pdserve/ray-up-test")["value"] == attempt
    finally:
        pid_file = home / "etcd.pid"
        if pid_file.exists():
            subprocess.run(["kill", pid_file.read_text().strip()], capture_output=True)


def test_nixl_read_from_b_moves_the_bytes_over_the_veth(pair, tmp_path):
    num_bytes = 8 << 20
    exchange = tmp_path / "nixl-exchange.json"
    rx_before, _ = pair.b.link_bytes()
    _, tx_before = pair.a.link_bytes()
    target = pair.a.popen(
        [PY, str(HERE / "nixl_peer.py"), "target", str(exchange), str(num_bytes), "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    reader = pair.b.run([PY, str(HERE / "nixl_peer.py"), "initiator", str(exchange), str(num_bytes), "120"], timeout_s=180)
    target_out, target_err = target.communicate(timeout=120)
    assert target.returncode == 0, target_err[-3000:]
    read = json.loads(reader.stdout.strip().splitlines()[-1])
    assert read == {"role": "initiator", "state": "DONE", "backend": "UCX", "bytes": num_bytes, "matches": True}
    assert json.loads(target_out.strip().splitlines()[-1])["notified"] is True
    rx_after, _ = pair.b.link_bytes()
    _, tx_after = pair.a.link_bytes()
    # The READ pulls A's bytes to B: they must show up on the veth, A sending and B receiving.
    assert rx_after - rx_before >= num_bytes
    assert tx_after - tx_before >= num_bytes


def test_harness_says_root_is_needed(monkeypatch):
    import netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(NetnsUnavailableError, match="needs root"):
        TwoHosts().up()
