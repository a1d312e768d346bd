"""A pdserve etcd client in one shot, run as a script inside a host's namespace.

Reaches etcd the way pdserve does: load_config(CONFIG) -> EtcdConnector(config.etcd) -> aetcd.
    etcd_probe.py CONFIG put KEY VALUE [DEADLINE_S]   retries until the put lands or the deadline
    etcd_probe.py CONFIG get KEY
    etcd_probe.py CONFIG status                      one attempt: {"ok": bool, "error": ...}
Prints one JSON line; exit status 0 when ok.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from cluster.config import load_config
from cluster.etcd_client import EtcdConnector, close_quietly


async def probe(config_path: str, op: str, args: list[str]) -> dict:
    connector = EtcdConnector(load_config(config_path).etcd, request_timeout_s=2.0)
    result: dict = {"op": op, "endpoint": connector.endpoints[0]}
    deadline = time.monotonic() + (float(args[2]) if op == "put" and len(args) > 2 else 0)
    while True:
        client = connector.new_client()
        try:
            if op == "put":
                await client.put(args[0].encode(), args[1].encode())
                result.update(ok=True)
            elif op == "get":
                got = await client.get(args[0].encode())
                result.update(ok=got is not None, value=got.value.decode() if got else None)
            else:
                status = await client.status()
                result.update(ok=True, version=status.version)
            return result
        except Exception as e:  # the probe reports any failure as data, for the test to judge
            result.update(ok=False, error=f"{type(e).__name__}: {e}")
            if time.monotonic() >= deadline:
                return result
            await asyncio.sleep(0.2)
        finally:
            await close_quietly(client)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("put", "get", "status"):
        print(__doc__, file=sys.stderr)
        return 2
    result = asyncio.run(probe(argv[0], argv[1], argv[2:]))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
