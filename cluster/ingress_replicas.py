"""IngressReplicas: every Serve replica of the OpenAI endpoint, for the manager's views of it
(the autoscaler's latencies, the dashboard's traffic).

Serve's proxy sends each HTTP request, a GET /metrics included, to ONE replica of the app, and
each replica counts only what it served. So the endpoint's metrics are read from every replica:

    find     GET <endpoint_url>/metrics once: its pdserve_endpoint_info{app=...} names the Serve app
             behind that URL (whichever replica answers, the app is the same)
    ask      handle.broadcast("snapshot") on the app's ingress deployment: one actor call per
             replica, no proxy (one replica: one call, as cheap as the HTTP scrape it replaces)

The app found is kept while the URL stays the same and the broadcasts succeed; after a failure
(the app was deleted, a replica did not answer) the next call finds it again. A replica that does
not answer fails the whole call: a sum without it would count too little and look plausible.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from workers.protocol import IngressSnapshot

ENDPOINT_INFO = "pdserve_endpoint_info"  # the ingress's Info metric (router/app.py), as exposed


def endpoint_app(metrics_text: str) -> str | None:
    """The Serve app named by the endpoint's pdserve_endpoint_info line; None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        if family.name in (ENDPOINT_INFO, ENDPOINT_INFO.removesuffix("_info")):
            for s in family.samples:
                if "app" in s.labels:
                    return s.labels["app"]
    return None


class IngressReplicas:
    """endpoint_url() -> where the endpoint answers (read at every call: the manager may move it)."""

    def __init__(self, endpoint_url: Callable[[], str], timeout_s: float = 5.0):
        self.endpoint_url = endpoint_url
        self.timeout_s = timeout_s
        self._found: tuple[str, str, object] | None = None  # (url, app name, DeploymentHandle)
        self._handles: dict[str, object] = {}  # app name -> its handle (each one runs a router thread: reused)

    @property
    def app_name(self) -> str | None:
        """The Serve app last found at the current endpoint_url (None: not found yet)."""
        found = self._found
        return found[1] if found and found[0] == self.endpoint_url().rstrip("/") else None

    async def snapshots(self) -> list[IngressSnapshot]:
        """One snapshot per running replica. Raises when the endpoint cannot be found or any
        replica does not answer within timeout_s."""
        url = self.endpoint_url().rstrip("/")
        if self._found is None or self._found[0] != url:
            self._found = (url, *await self._find(url))
        _, app, handle = self._found
        try:
            # broadcast() may set up the handle's router on first use (blocking calls): a thread
            response = await asyncio.to_thread(handle.broadcast, "snapshot")
            results = await response.results_async(timeout_s=self.timeout_s, return_exceptions=True)
        except Exception:
            self._found = None
            raise
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self._found = None
            raise RuntimeError(f"{len(failed)} of {len(results)} replicas of Serve app {app!r} did not answer: "
                               f"{type(failed[0]).__name__}: {failed[0]}")
        return results

    async def _find(self, url: str) -> tuple[str, object]:
        from ray import serve

        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            r = await client.get(f"{url}/metrics")
        if r.status_code != 200:
            raise RuntimeError(f"GET {url}/metrics answered {r.status_code}")
        app = endpoint_app(r.text)
        if app is None:
            raise RuntimeError(f"{url}/metrics has no {ENDPOINT_INFO} line naming its Serve app: not a pdserve "
                               "endpoint, or one older than this manager")
        if app not in self._handles:
            self._handles[app] = await asyncio.to_thread(serve.get_app_handle, app)
        return app, self._handles[app]
