"""A decode worker's mailboxes (workers/subscribers.py): a mailbox that run() made and no subscribe()
attached to is a lease too; real Subscribers and asyncio tasks standing in for run() calls."""

from __future__ import annotations

import asyncio

import pytest

from workers.protocol import RequestFailedError
from workers.subscribers import Subscribers

TTL = 0.3


async def _run_forever(subs: Subscribers, sid: str) -> asyncio.Task:
    """What DecodeWorker.run does with its mailbox, minus the engine: registers itself, waits."""
    async def run():
        box = subs.box_for(sid)
        box.runs.add(asyncio.current_task())
        await asyncio.sleep(3600)

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    return task


async def test_unattached_mailbox_expires_and_cancels_its_runs():
    subs = Subscribers(ttl_s=TTL)
    task = await _run_forever(subs, "gone")
    assert subs.running() == {"gone": 1}
    await asyncio.sleep(TTL * 2)
    assert task.cancelled() or task.done()
    assert subs.running() == {}
    with pytest.raises(RequestFailedError):
        subs.box_for("gone")  # a late run() for it fails instead of running unread


async def test_renewals_keep_an_unattached_mailbox():
    subs = Subscribers(ttl_s=TTL)
    task = await _run_forever(subs, "slow")
    for _ in range(8):  # 2 TTLs, renewed every TTL / 4
        await asyncio.sleep(TTL / 4)
        assert subs.renew("slow")
    assert not task.done() and subs.running() == {"slow": 1}
    subs.close("slow")
    await asyncio.sleep(0)
    assert task.cancelled()


async def test_subscribe_takes_over_the_lease():
    subs = Subscribers(ttl_s=TTL)
    task = await _run_forever(subs, "late")
    box = subs.box_for("late", subscribing=True)  # subscribe() arrives after run()
    await asyncio.sleep(TTL * 2)  # no renewals: the watchdog has stopped; subscribe() owns the lease now
    assert not task.done() and subs.running() == {"late": 1}
    assert box.watchdog.done()
    subs.close("late")
    await asyncio.sleep(0)
    assert task.cancelled()
