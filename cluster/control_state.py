"""ControlState: control-plane flags the manager writes and workers/router watch.

    /pdserve/<cluster>/drain/<worker_id>     DrainFlag: stop routing new requests to the worker
    /pdserve/<cluster>/kv-quota/<worker_id>  {"num_blocks": N}: the worker's KV quota override

These keys carry no lease: they outlive the manager and an etcd restart, and are removed explicitly
(clear_*). Calls fail fast with EtcdUnavailableError (the manager answers 503); they do not retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass

from cluster.config import EtcdConfig
from cluster.etcd_client import EtcdConnector, EtcdUnavailableError, close_quietly
from cluster.keys import ClusterKeys, validate_worker_id
from cluster.prefix_mirror import PrefixMirror

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DrainFlag:
    worker_id: str
    reason: str
    set_at: float  # unix time


def decode_drain_flag(worker_id: str, raw: bytes) -> DrainFlag:
    try:
        fields = json.loads(raw)
        return DrainFlag(worker_id=worker_id, reason=str(fields["reason"]), set_at=float(fields["set_at"]))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a drain flag ({e!r}): {raw[:200]!r}") from e


def decode_kv_quota(worker_id: str, raw: bytes) -> int:
    try:
        num_blocks = json.loads(raw)["num_blocks"]
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a kv quota ({e!r}): {raw[:200]!r}") from e
    if not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"kv quota of {worker_id} must be an integer >= 0, got {num_blocks!r}")
    return num_blocks


class ControlState:
    def __init__(self, etcd_config: EtcdConfig, cluster_name: str, *, connector: EtcdConnector | None = None):
        self.keys = ClusterKeys(cluster_name)
        self._connector = connector or EtcdConnector(etcd_config)
        self._client = None

    async def close(self) -> None:
        await close_quietly(self._client)
        self._client = None

    # --- drain flags ---------------------------------------------------------------------------

    async def set_drain(self, worker_id: str, reason: str = "") -> DrainFlag:
        flag = DrainFlag(worker_id=worker_id, reason=reason, set_at=time.time())
        body = {k: v for k, v in asdict(flag).items() if k != "worker_id"}
        await self._call("put", self.keys.drain(worker_id), json.dumps(body).encode())
        return flag

    async def clear_drain(self, worker_id: str) -> bool:
        """True if a flag was removed."""
        return await self._call("delete", self.keys.drain(worker_id)) is not None

    async def get_drain(self, worker_id: str) -> DrainFlag | None:
        got = await self._call("get", self.keys.drain(worker_id))
        return None if got is None else decode_drain_flag(worker_id, got.value)

    async def list_drains(self) -> dict[str, DrainFlag]:
        return await self._list(self.keys.drain_prefix, decode_drain_flag)

    def drain_mirror(self) -> PrefixMirror[DrainFlag]:
        """A watch of all drain flags, keyed by worker id; the caller start()s and stop()s it."""
        return PrefixMirror(self._connector, self.keys.drain_prefix, decode_drain_flag)

    # --- KV quota overrides --------------------------------------------------------------------

    async def set_kv_quota(self, worker_id: str, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        await self._call("put", self.keys.kv_quota(worker_id), json.dumps({"num_blocks": num_blocks}).encode())

    async def clear_kv_quota(self, worker_id: str) -> bool:
        return await self._call("delete", self.keys.kv_quota(worker_id)) is not None

    async def get_kv_quota(self, worker_id: str) -> int | None:
        got = await self._call("get", self.keys.kv_quota(worker_id))
        return None if got is None else decode_kv_quota(worker_id, got.value)

    async def list_kv_quotas(self) -> dict[str, int]:
        return await self._list(self.keys.kv_quota_prefix, decode_kv_quota)

    def kv_quota_mirror(self) -> PrefixMirror[int]:
        """A watch of all KV quota overrides, keyed by worker id; the caller start()s and stop()s it."""
        return PrefixMirror(self._connector, self.keys.kv_quota_prefix, decode_kv_quota)

    # --- plumbing ------------------------------------------------------------------------------

    async def _list(self, prefix: str, decode) -> dict:
        response = await self._call("get_prefix", prefix)
        items = {}
        for kv in response:
            worker_id = kv.key.decode()[len(prefix):]
            try:
                validate_worker_id(worker_id)
                items[worker_id] = decode(worker_id, kv.value)
            except ValueError as e:
                log.error("ignoring malformed etcd entry %s%s: %s", prefix, worker_id, e)
        return items

    async def _call(self, method: str, key: str, *args):
        if self._client is None:
            self._client = self._connector.new_client()
        try:
            return await getattr(self._client, method)(key.encode(), *args)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self.close()  # the next call starts over on a fresh client (next endpoint)
            raise EtcdUnavailableError(
                f"etcd {method} {key} failed via {self._connector.last_endpoint}: {type(e).__name__}: {e}"
            ) from e
