"""The management API's auth rule on the real app, in process: every path (spec and unknown paths
included) is 401 without the right bearer token, before any routing reaches the manager."""

import httpx
import pytest

from cluster.admin_api import create_app

TOKEN = "s3cret-token-for-unit-test"


@pytest.fixture
def client():
    # manager=None: any request that got past the auth check and reached a handler would fail
    app = create_app(None, TOKEN)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")


def all_routes():
    app = create_app(None, TOKEN)
    spec = app.openapi()
    routes = [(method.upper(), path.replace("{worker_id}", "w").replace("{role}", "decode"))
              for path, ops in spec["paths"].items() for method in ops]
    return routes + [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no-such-path"), ("POST", "/cluster")]


@pytest.mark.parametrize("method,path", all_routes())
async def test_every_route_needs_the_token(client, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        r = await client.request(method, path, headers=headers, json={})
        assert r.status_code == 401, (method, path, headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        body = r.json()["error"]
        assert body["type"] == "authentication_error" and body["code"] == "invalid_token" and body["message"]
        assert TOKEN not in r.text


async def test_the_spec_is_served_with_the_token_and_declares_bearer_auth(client):
    r = await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    spec = r.json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": "server.admin_token"}
    assert {"/cluster", "/cluster/workers/{worker_id}/drain", "/cluster/kv-quota/{worker_id}",
            "/cluster/pools/{role}/scale"} <= set(spec["paths"])
    assert all(op.get("security") for ops in spec["paths"].values() for op in ops.values())
    # no Swagger UI: a browser could not send the header
    assert (await client.get("/docs", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 404


def test_an_empty_token_is_refused():
    with pytest.raises(ValueError):
        create_app(None, "").build_middleware_stack()
