"""The live dashboard page (cluster/static/dashboard.html), served by the management API at
GET /dashboard.

Auth choice: the page itself is public and holds no cluster data (a browser navigating to a URL
cannot send a bearer header); every data route it calls (/cluster, /cluster/workers,
/cluster/traffic) needs the bearer token like the rest of the API. The page takes the token from
the URL fragment (``/dashboard#token=...``: fragments never reach the server or its logs; the
page removes it from the address bar at once) or from a form, keeps it in the tab's
sessionStorage, and sends it as ``Authorization: Bearer``. Its Content-Security-Policy allows
only its own inline script (by hash) and requests to its own origin, so nothing on the page can
send the token elsewhere.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from fastapi.responses import HTMLResponse

DASHBOARD_PATH = "/dashboard"


@functools.cache
def _page() -> tuple[str, str]:
    html = resources.files("cluster").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    if not scripts:
        raise RuntimeError("cluster/static/dashboard.html has no inline script")
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    csp = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


def dashboard_response() -> HTMLResponse:
    html, csp = _page()
    return HTMLResponse(html, headers={
        "Content-Security-Policy": csp, "Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"})


def is_public(scope) -> bool:
    """The one path the management API serves without the token: the page, not its data."""
    return scope.get("path") == DASHBOARD_PATH and scope.get("method") == "GET"
