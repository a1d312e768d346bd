"""Serves the management API (cluster/admin_api.py) with uvicorn on the manager actor's own event
loop, bound to server.host:server.admin_port.

    handle = await start_admin_server(manager)   # returns once it accepts connections
    await handle.stop()

The socket is bound here, before uvicorn starts, so a taken port is an OSError with a message
naming the port (uvicorn itself would sys.exit inside the actor). uvicorn never installs signal
handlers here: the actor's process belongs to Ray. Access logs go through the `uvicorn.access`
logger: method, path, status and client address only; never headers, so never the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

log = logging.getLogger(__name__)


class AdminServerError(RuntimeError):
    """The management API could not start (no token, port taken, ...)."""


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # signals belong to the host process (a Ray actor)


class AdminServer:
    def __init__(self, server: _EmbeddedServer, task: asyncio.Task, sock: socket.socket):
        self._server, self._task, self._sock = server, task, sock
        self.host, self.port = sock.getsockname()[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
        except Exception as e:
            log.warning("management API stopped with %r", e)
        finally:
            self._sock.close()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise AdminServerError(f"the management API cannot listen on {host}:{port} (server.host, "
                               f"server.admin_port / --admin-port): {e.strerror or e}") from e
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def start_admin_server(manager, startup_timeout_s: float = 30.0) -> AdminServer:
    from cluster.admin_api import create_app

    server_config = manager.config.server
    token = server_config.admin_token.get_secret_value() if server_config.admin_token is not None else ""
    if not token:
        raise AdminServerError("the management API needs a token: set server.admin_token in the config or "
                               "PDSERVE_ADMIN_TOKEN (`pdserve up` generates one when neither is set)")
    sock = bind(server_config.host, server_config.admin_port)
    config = uvicorn.Config(create_app(manager, token), lifespan="off", log_config=None, access_log=True,
                            server_header=False, timeout_graceful_shutdown=5)
    server = _EmbeddedServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="pdserve-admin-api")
    deadline = asyncio.get_running_loop().time() + startup_timeout_s
    while not server.started:
        if task.done():
            sock.close()
            exc = task.exception() if not task.cancelled() else None
            raise AdminServerError(f"the management API exited while starting: {exc!r}")
        if asyncio.get_running_loop().time() > deadline:
            server.should_exit = True
            sock.close()
            raise AdminServerError(f"the management API did not start within {startup_timeout_s:g} s")
        await asyncio.sleep(0.02)
    handle = AdminServer(server, task, sock)
    log.info("management API listening on %s", handle.url)
    return handle
