"""The management API server's lifecycle on an event loop (as in the manager actor): it listens
once started, refuses to start without a token or on a taken port (a clear error, never a
sys.exit), and stop() closes the port."""

import socket
import types

import httpx
import pytest

from cluster.admin_server import AdminServerError, start_admin_server
from cluster.config import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manager_with(port: int, token: str | None):
    """Only what the server reads before any request reaches a handler."""
    overrides = {"server.admin_port": port} | ({"server.admin_token": token} if token else {})
    return types.SimpleNamespace(config=load_config(None, overrides))


async def test_serves_then_stops(monkeypatch):
    monkeypatch.delenv("PDSERVE_ADMIN_TOKEN", raising=False)
    port = free_port()
    handle = await start_admin_server(manager_with(port, "tok"))
    try:
        async with httpx.AsyncClient(base_url=handle.url) as client:
            assert (await client.get("/openapi.json")).status_code == 401
            r = await client.get("/openapi.json", headers={"Authorization": "Bearer tok"})
            assert r.status_code == 200 and r.json()["info"]["title"] == "pdserve management API"
            assert "server" not in r.headers  # no server banner
    finally:
        await handle.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5)


async def test_a_taken_port_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("PDSERVE_ADMIN_TOKEN", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(AdminServerError, match=f"127.0.0.1:{port}.*admin_port"):
            await start_admin_server(manager_with(port, "tok"))


async def test_no_token_no_server(monkeypatch):
    monkeypatch.delenv("PDSERVE_ADMIN_TOKEN", raising=False)
    with pytest.raises(AdminServerError, match="PDSERVE_ADMIN_TOKEN"):
        await start_admin_server(manager_with(free_port(), None))
