"""Subscribers: a decode worker's mailboxes, one per subscription (a router process's token stream).

    DecodeWorker.run(req)          pushes each TokenDelta of req into the mailbox of req.subscriber_id
    DecodeWorker.subscribe(sid)    takes everything in sid's mailbox, one Ray stream item at a time

Invariants: deltas of one request stay in push order (one list, appended and taken whole); a
mailbox lives from the first box_for() (subscribe() or run()) to close(); close() cancels every run() task
still pushing into it (their own cleanup aborts the request and frees its KV, as a cancelled
stream's does) and remembers the id, so a late run() for it fails instead of running unread.

A subscription is a lease: its router renews it (DecodeWorker.renew_subscription) every fraction
of its TTL, and subscribe() ends it once a TTL passed without a renewal. Ray does not end an actor's
streaming call, nor cancel its other calls, when the calling process dies (seen with Ray 2.60: a
killed caller's stream kept running); without the lease, a crashed router replica's requests would
decode to their deadline holding KV, and its subscribe() would wait forever. A mailbox that run()
made and no subscribe() ever attached to (the router died between the two calls) is held to the
same lease by a watchdog: ended after ``ttl_s`` without subscribe() or a renewal, its runs cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from workers.protocol import RequestFailedError, TokenDelta

# a subscription's lease: subscribe() ends it (cancelling its runs) after this long without a
# renewal from its router, which renews every SUBSCRIPTION_TTL_S / 4 (router/token_streams.py)
SUBSCRIPTION_TTL_S = 20.0
_MAX_CLOSED_IDS = 4096  # ids of ended subscriptions remembered (each new subscription has a new id)

log = logging.getLogger(__name__)


class Mailbox:
    def __init__(self):
        self._deltas: list[TokenDelta] = []
        self._ready = asyncio.Event()
        self.runs: set[asyncio.Task] = set()  # run() calls pushing here
        self.renewed_at = time.monotonic()  # the subscriber's last sign of life (subscribe, renew)
        self.subscribed = False  # a subscribe() call has attached (it enforces the lease from then on)
        self.watchdog: asyncio.Task | None = None  # enforces the lease until then

    def push(self, delta: TokenDelta) -> None:
        self._deltas.append(delta)
        self._ready.set()

    async def take(self, timeout_s: float) -> list[TokenDelta]:
        """Everything pushed since the last take; waits while there is nothing, at most timeout_s
        (then returns [])."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            return []
        self._ready.clear()
        out, self._deltas = self._deltas, []
        return out


class Subscribers:
    def __init__(self, ttl_s: float = SUBSCRIPTION_TTL_S):
        self.ttl_s = ttl_s  # the lease of a mailbox no subscribe() has attached to yet
        self._boxes: dict[str, Mailbox] = {}
        self._closed: collections.OrderedDict[str, None] = collections.OrderedDict()

    def box_for(self, subscriber_id: str, *, subscribing: bool = False) -> Mailbox:
        """The mailbox of a live subscription, made here by whichever of subscribe() (``subscribing``)
        and run() comes first; one made by run() is watched until a subscribe() attaches."""
        if subscriber_id in self._closed:
            raise RequestFailedError(f"the token stream {subscriber_id} has ended; its router opens a new one")
        box = self._boxes.get(subscriber_id)
        if box is None:
            box = self._boxes[subscriber_id] = Mailbox()
            if not subscribing:
                box.watchdog = asyncio.get_running_loop().create_task(self._expire_unattached(subscriber_id, box))
        if subscribing:
            box.subscribed = True
        return box

    async def _expire_unattached(self, subscriber_id: str, box: Mailbox) -> None:
        while self._boxes.get(subscriber_id) is box and not box.subscribed:
            left = box.renewed_at + self.ttl_s - time.monotonic()
            if left <= 0:
                n = self.close(subscriber_id)
                log.warning("token stream %s: no subscribe() and no renewal for %.0f s (its router is gone); "
                            "cancelled its %d running requests", subscriber_id, self.ttl_s, n)
                return
            await asyncio.sleep(left)

    def renew(self, subscriber_id: str) -> bool:
        """The subscriber is alive; False when its subscription is not live (ended, or unknown)."""
        box = self._boxes.get(subscriber_id)
        if box is None:
            return False
        box.renewed_at = time.monotonic()
        return True

    def close(self, subscriber_id: str) -> int:
        """End a subscription: cancel its running requests, drop its mailbox. Returns how many."""
        self._closed[subscriber_id] = None
        while len(self._closed) > _MAX_CLOSED_IDS:
            self._closed.popitem(last=False)
        box = self._boxes.pop(subscriber_id, None)
        if box is None:
            return 0
        if box.watchdog is not None and box.watchdog is not asyncio.current_task():
            box.watchdog.cancel()
        for task in box.runs:
            task.cancel()
        return len(box.runs)

    def running(self) -> dict[str, int]:
        """Requests running per live subscription."""
        return {sid: len(box.runs) for sid, box in self._boxes.items()}
