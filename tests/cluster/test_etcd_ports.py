"""LocalEtcd's automatic ports: the client and peer ports never coincide. Two ports picked one
after the other can (the first probe socket is closed before the second binds, and the kernel may
hand the same ephemeral port out again): a benchmark's cluster on a GPU host failed to start with
"etcd client and peer ports must differ" that way."""

import socket

import pytest

from cluster import etcd_server
from cluster.etcd_server import LocalEtcd, pick_free_port


class _Repeating:
    """socket.socket whose first binds all get ``port``, later ones the next ports: the kernel
    offering the same free port twice in a row."""

    def __init__(self, port: int, repeats: int):
        self.port, self.left, self.closed = port, repeats, 0

    def __call__(self, *args):
        outer = self

        class Sock:
            def bind(self, addr):
                if outer.left > 0:
                    outer.left -= 1
                    self.bound = outer.port
                else:
                    outer.port += 1
                    self.bound = outer.port

            def getsockname(self):
                return ("127.0.0.1", self.bound)

            def close(self):
                outer.closed += 1

        return Sock()


def test_pick_free_port_skips_the_ports_to_avoid(monkeypatch):
    fake = _Repeating(40000, repeats=3)
    monkeypatch.setattr(etcd_server.socket, "socket", fake)
    assert pick_free_port(avoid=(40000,)) == 40001
    assert fake.closed == 4  # every probe socket closed


def test_local_etcd_ports_differ_when_the_kernel_repeats_one(monkeypatch, tmp_path):
    monkeypatch.setattr(etcd_server, "find_etcd_binary", lambda: "etcd")
    monkeypatch.setattr(etcd_server.socket, "socket", _Repeating(40100, repeats=5))
    etcd = LocalEtcd(tmp_path)
    assert etcd.client_port == 40100 and etcd.peer_port != etcd.client_port
    monkeypatch.setattr(etcd_server.socket, "socket", _Repeating(40200, repeats=5))
    etcd = LocalEtcd(tmp_path, peer_port=40200)  # the peer port given: the client's avoids it
    assert etcd.peer_port == 40200 and etcd.client_port != 40200
    with pytest.raises(ValueError, match="must differ"):  # both given and equal: the caller's mistake
        LocalEtcd(tmp_path, client_port=40300, peer_port=40300)


def test_pick_free_port_on_the_real_kernel_is_bindable():
    port = pick_free_port(avoid=(pick_free_port(),))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
