"""PoolKeeper: replaces workers whose Ray actor died, so a pool keeps its replica count.

Every ``interval_s`` the manager's ready and draining workers are pinged (Ray's built-in
``__ray_ready__``, answered by the actor's own process). Only ``ActorDiedError`` counts as death:
a worker that is merely slow or frozen (SIGSTOP, a long GC) times out here and is left alone —
its etcd lease decides whether routing skips it (router/cluster_view.py), and it may come back.
A dead worker is forgotten (its etcd keys cleared, so routing drops it at once instead of after
its lease TTL) and, unless it was draining or its pool is already at its desired size, a new
worker is started in its place. A dead decode worker's pending READs will never come: the
prefill workers free the KV handles pinned for it at once (``release_reader``), not when their
leases expire.

Workers that fail to *start* are not replaced here: a bad model path or an OOM at load would
fail the same way again. Scaling the pool (REST or the autoscaler) retries them explicitly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ray.exceptions import ActorDiedError

from cluster.periodic import PeriodicLoop
from workers.protocol import Role

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Death:
    worker_id: str
    role: Role
    error: str


async def find_dead(workers: list, ping_timeout_s: float = PING_TIMEOUT_S) -> list[Death]:
    """The ManagedWorkers (ready or draining) whose actor is gone; slow or frozen ones are not."""
    async def check(w):
        try:
            await asyncio.wait_for(w.actor.__ray_ready__.remote(), ping_timeout_s)
        except ActorDiedError as e:
            return Death(w.worker_id, w.role, f"{type(e).__name__}: {str(e)[:300]}")
        except Exception:  # timeout, transiently unavailable: not known dead
            pass
        return None

    found = await asyncio.gather(*(check(w) for w in workers))
    return [d for d in found if d is not None]


class PoolKeeper(PeriodicLoop):
    loop_name = "pdserve-pool-keeper"

    def __init__(self, interval_s: float, workers: Callable[[], list], on_death: Callable[[Death], Awaitable[None]]):
        super().__init__(interval_s)
        self.workers = workers
        self.on_death = on_death

    async def step(self) -> None:
        watched = [w for w in self.workers() if w.state in ("ready", "draining")]
        for death in await find_dead(watched):
            log.warning("worker %s died (%s)", death.worker_id, death.error)
            await self.on_death(death)
            if death.role is Role.DECODE:
                await release_reader([w for w in watched if w.role is Role.PREFILL], death.worker_id)


async def release_reader(prefill_workers: list, reader_id: str, timeout_s: float = PING_TIMEOUT_S) -> int:
    """Ask every prefill worker to free the handles pinned for ``reader_id``; returns how many
    were freed. A prefill worker that does not answer keeps them until their leases expire."""
    async def one(w):
        try:
            return await asyncio.wait_for(w.actor.release_reader.remote(reader_id), timeout_s)
        except Exception as e:  # dead or slow too: its leases still bound what it holds
            log.warning("could not free %s's handles on %s: %r", reader_id, w.worker_id, e)
            return 0

    return sum(await asyncio.gather(*(one(w) for w in prefill_workers)))
