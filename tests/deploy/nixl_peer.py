"""One side of a NIXL READ between two hosts, run as a script inside a host's namespace.

    target    (host A): registers a tensor holding a known byte pattern, writes its agent metadata
                        and transfer descriptors to EXCHANGE_FILE, waits for the reader's notification.
    initiator (host B): reads EXCHANGE_FILE, loads A's metadata, READs A's tensor into its own,
                        checks every byte, notifies A.

The exchange file stands in for the control channel (etcd / an RPC in pdserve): only metadata goes
through it; the bytes move over UCX. Each side prints one JSON line last; exit status 0 = success.
Usage: nixl_peer.py {target|initiator} EXCHANGE_FILE NUM_BYTES [DEADLINE_S]
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

import torch

NOTIFICATION = b"pdserve-netns-read-done"


def pattern(num_bytes: int) -> torch.Tensor:
    # 251 is prime, so the pattern does not repeat on any power-of-two stride.
    return (torch.arange(num_bytes, dtype=torch.int64) % 251).to(torch.uint8)


def make_agent(name: str):
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
    if "UCX" not in agent.backends:
        raise SystemExit(f"NIXL has no UCX backend here (plugins: {agent.get_plugin_list()}): install nixl with UCX")
    return agent


def run_target(exchange: Path, num_bytes: int, deadline_s: float) -> dict:
    agent = make_agent("host-a")
    tensor = pattern(num_bytes)
    agent.register_memory(tensor)
    descs = agent.get_serialized_descs(agent.get_xfer_descs(tensor))
    payload = {"metadata": base64.b64encode(agent.get_agent_metadata()).decode(), "descs": base64.b64encode(descs).decode()}
    tmp = exchange.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, exchange)  # the reader never sees a half-written file
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        notifs = agent.get_new_notifs()
        if any(NOTIFICATION in messages for messages in notifs.values()):
            return {"role": "target", "notified": True, "from": sorted(notifs)}
        time.sleep(0.01)
    raise SystemExit(f"target: no notification from the reader within {deadline_s} s")


def run_initiator(exchange: Path, num_bytes: int, deadline_s: float) -> dict:
    deadline = time.monotonic() + deadline_s
    while not exchange.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"initiator: {exchange} did not appear within {deadline_s} s")
        time.sleep(0.05)
    payload = json.loads(exchange.read_text())
    agent = make_agent("host-b")
    remote_name = agent.add_remote_agent(base64.b64decode(payload["metadata"]))
    remote_descs = agent.deserialize_descs(base64.b64decode(payload["descs"]))
    local = torch.zeros(num_bytes, dtype=torch.uint8)
    agent.register_memory(local)
    handle = agent.initialize_xfer("READ", agent.get_xfer_descs(local), remote_descs, remote_name, NOTIFICATION)
    state = agent.transfer(handle)
    while state == "PROC":
        if time.monotonic() > deadline:
            raise SystemExit(f"initiator: READ of {num_bytes} bytes still in progress after {deadline_s} s")
        time.sleep(0.001)
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        raise SystemExit(f"initiator: READ ended in state {state}")
    backend = agent.query_xfer_backend(handle)
    matches = bool(torch.equal(local, pattern(num_bytes)))
    agent.release_xfer_handle(handle)
    return {"role": "initiator", "state": state, "backend": backend, "bytes": num_bytes, "matches": matches}


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4) or argv[0] not in ("target", "initiator"):
        print(__doc__, file=sys.stderr)
        return 2
    role, exchange, num_bytes = argv[0], Path(argv[1]), int(argv[2])
    deadline_s = float(argv[3]) if len(argv) == 4 else 60.0
    result = (run_target if role == "target" else run_initiator)(exchange, num_bytes, deadline_s)
    print(json.dumps(result), flush=True)
    return 0 if result.get("matches", True) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
