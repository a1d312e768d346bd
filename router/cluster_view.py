"""The router's live view of the cluster: who is registered (etcd), how loaded each worker is
and which prefixes it caches (polled worker state feeding the global PrefixIndex), and the
routing decision for a request.

Membership comes from etcd; a worker that is registered but does not answer its poll, or whose
engine reports no progress for router.engine_stall_timeout_s (its poll answers at once, from what
the engine thread last published), is left out of routing until it answers or moves again, and
one whose registration lapsed while it still answers stays for up to a lease TTL while it
registers again (_sync_membership). While etcd is unreachable the last known membership stays in
force (MembershipWatcher keeps it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError

from cluster.config import EtcdConfig
from cluster.membership import MembershipWatcher
from router.config import RouterConfig
from router.overlap_alarm import ZeroOverlapAlarm
from router.policy import RoundRobin, RoutePlan, plan_route
from router.prefill_rates import PrefillRates
from router.prefix_index import PrefixIndex
from workers.block_hash import block_hashes
from workers.protocol import Role, WorkerCounters, WorkerInfo, WorkerLoad, WorkerState

log = logging.getLogger(__name__)

MAX_POLL_FAILURES = 3  # polls in a row without an answer before a live worker counts as unhealthy
# A worker whose registration vanished (lease expired: its keepalive starved on a loaded machine,
# or etcd was slow) while it still answers polls stays routable this long after its last answer,
# and at most one lease TTL after it left etcd: it notices the lost lease at its next refresh
# (TTL/3) and registers again. A dead actor (RayActorError) or a hung one (no answer) is not kept.
LAPSED_ANSWER_WITHIN_S = 1.0


def ray_namespace(cluster_name: str) -> str:
    return f"pdserve-{cluster_name}"


@dataclass
class WorkerEntry:
    info: WorkerInfo
    actor: object  # ray ActorHandle
    engine_stall_timeout_s: float  # router.engine_stall_timeout_s
    state: WorkerState | None = None
    last_seq: int = -1
    last_ok_at: float = 0.0
    num_poll_failures: int = 0
    num_routed: int = 0  # requests this router sent it and that have not finished
    # blocks of requests routed here since the last poll: the poll is up to poll_interval_s old,
    # and a burst of requests must not all pick the same "idle" worker in the meantime
    blocks_since_poll: int = 0
    requests_since_poll: int = 0
    # Pending prefill tokens, tracked by this router rather than waiting for polls: a request's
    # uncached prompt tokens count on the worker that prefills it (a prefill worker, or the decode
    # worker for a local prefill) from routing until its first token reaches this router (the
    # prefill is done then, on either path) or the attempt ends. Polls come every poll_interval_s
    # and their pending count is as old as the poll: a decode worker that finished a local prompt
    # in 15 ms looked busy for 100-200 ms, so the ttft rule kept ~10 % of prompts local where it
    # could keep more. What the worker reports beyond this router's own requests (other router
    # replicas) is ``others_pending``, set at each poll's answer.
    prefill_in_flight: dict = field(default_factory=dict)  # attempt key -> uncached tokens
    # while a poll is in flight: the attempts in flight when it was sent or routed since, i.e. every
    # request of this router its answer may count
    poll_window: dict | None = None
    others_pending: int = 0
    poll_task: asyncio.Task | None = None

    is_dead: bool = False  # its actor is gone (a poll raised RayActorError)
    left_etcd_at: float | None = None  # monotonic time its registration was first seen missing

    @property
    def is_engine_stalled(self) -> bool:
        """Its last answer reported an engine that made no progress for engine_stall_timeout_s."""
        return self.state is not None and self.state.load.engine_stalled_s >= self.engine_stall_timeout_s

    @property
    def is_healthy(self) -> bool:
        # A slow poll (a busy worker, a loaded machine) or a slow engine step is not a dead worker:
        # only a dead actor, several polls in a row without an answer, or an engine stuck for
        # engine_stall_timeout_s take it out of routing and readiness.
        return (self.state is not None and not self.is_dead and self.num_poll_failures < MAX_POLL_FAILURES
                and not self.is_engine_stalled)

    def load(self) -> WorkerLoad:
        s = self.state.load
        # add this router's own in-flight count, which is fresher than the last poll
        queued = max(s.num_waiting + self.requests_since_poll, s.num_waiting + self.num_routed - s.num_running)
        return WorkerLoad(s.worker_id, s.role, s.num_running, queued,
                          s.num_used_blocks + self.blocks_since_poll, s.num_total_blocks, s.num_pinned_blocks,
                          s.is_draining, self.others_pending + sum(self.prefill_in_flight.values()),
                          s.engine_stalled_s, s.engine_has_work)

    def add_prefill(self, key: str, num_tokens: int) -> None:
        self.prefill_in_flight[key] = num_tokens
        if self.poll_window is not None:
            self.poll_window[key] = num_tokens


class ClusterView:
    def __init__(self, cluster_name: str, etcd: EtcdConfig, config: RouterConfig, block_size: int,
                 poll_interval_s: float = 0.1):
        self.cluster_name = cluster_name
        self.namespace = ray_namespace(cluster_name)
        self.config = config
        self.block_size = block_size
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = config.poll_timeout_s
        self.watcher = MembershipWatcher(etcd, cluster_name)
        self.lapse_grace_s = float(etcd.lease_ttl_s)
        self.index = PrefixIndex(config.index_max_blocks_per_worker, config.index_max_workers)
        self.rates = PrefillRates(config.prefill_rate_window_s)
        self.workers: dict[str, WorkerEntry] = {}
        self.round_robin = RoundRobin()
        self.alarm = ZeroOverlapAlarm(config.zero_overlap_window_requests or 10**9, config.zero_overlap_min_repeats)
        self.decisions: collections.deque = collections.deque(maxlen=max(1, config.recent_decisions))
        self.rng = random.Random(0)
        # attempt key -> (the worker its prefill counts on, "local" | "remote", when it was routed)
        self._prefilled_on: dict[str, tuple[str, str, float]] = {}
        # path -> [seconds, count] of finished attempts' routing -> prefill_done (/metrics: how long a
        # prompt counts as pending; the ttft rule's cap keeps a prompt remote while a local one does)
        self.prefill_pending: dict[str, list] = {"local": [0.0, 0], "remote": [0.0, 0]}
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self.watcher.start()
        await self.watcher.wait_synced(10)
        self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for w in self.workers.values():
            if w.poll_task is not None:
                w.poll_task.cancel()
        await self.watcher.stop()

    # -- readiness -----------------------------------------------------------------------------
    def is_ready(self) -> tuple[bool, str]:
        # the workers in this view: registered ones, plus lapsed ones still answering (_sync_membership)
        healthy = {r: sum(1 for w in self.workers.values() if w.info.role == r and w.is_healthy) for r in Role}
        if (any(healthy.values()) and healthy[Role.DECODE] >= self.config.min_decode_workers
                and healthy[Role.PREFILL] >= self.config.min_prefill_workers):
            return True, "ready"
        ready, reason = self.watcher.is_ready(self.config.min_prefill_workers, self.config.min_decode_workers)
        if not ready:
            return False, reason
        return False, (f"waiting for workers to answer: {healthy[Role.PREFILL]}/{self.config.min_prefill_workers} "
                       f"prefill, {healthy[Role.DECODE]}/{self.config.min_decode_workers} decode")

    # -- routing -------------------------------------------------------------------------------
    def plan(self, prompt_token_ids: list[int], cache_salt: str | None, attempt_key: str,
             exclude: frozenset[str] = frozenset(), prompt_logprobs: bool = False) -> tuple[RoutePlan, tuple[str, ...]]:
        """Choose a decode worker and a ranked list of prefill workers (empty: prefill locally; a
        request with ``prompt_logprobs`` has no cached prefix, see router/policy.py). The prompt's uncached
        tokens count as pending on the worker that prefills it until ``prefill_done(attempt_key)``,
        which the caller must call once the first token arrived or the attempt ended (it may call
        it more than once)."""
        hashes = block_hashes(prompt_token_ids, self.block_size, cache_salt)
        overlaps = self.index.overlap(hashes) if hashes else {}
        usable = [w for w in self.workers.values() if w.is_healthy and w.info.worker_id not in exclude]
        decode = [w.load() for w in usable if w.info.role == Role.DECODE]
        prefill = [w.load() for w in usable if w.info.role == Role.PREFILL]
        rates = None
        if self.config.conditional_mode == "ttft":
            rates = {w.info.worker_id: self.rates.rate(w.info.worker_id, self._rate_prior(w.info.role)).tokens_per_s
                     for w in usable}
        plan = plan_route(len(prompt_token_ids), self.block_size, decode, prefill, overlaps, self.config,
                          rng=self.rng, round_robin=self.round_robin, prefill_rates=rates,
                          prompt_logprobs=prompt_logprobs)
        ranked: tuple[str, ...] = ()
        if plan.prefill is not None:
            others = sorted((s for s in plan.prefill.scores if s.worker_id != plan.prefill.worker_id),
                            key=lambda s: -s.score)
            ranked = (plan.prefill.worker_id, *(s.worker_id for s in others))
        num_new_blocks = -(-len(prompt_token_ids) // self.block_size)
        for chosen in (plan.decode, plan.prefill):
            if chosen is not None and chosen.worker_id in self.workers:
                self.workers[chosen.worker_id].blocks_since_poll += num_new_blocks
                self.workers[chosen.worker_id].requests_since_poll += 1
        prefilled_on, num_to_prefill = ((plan.decode.worker_id, plan.num_uncached_tokens) if plan.prefill is None
                                        else (plan.prefill.worker_id, plan.num_remote_uncached_tokens))
        if prefilled_on in self.workers and num_to_prefill > 0:
            self.workers[prefilled_on].add_prefill(attempt_key, num_to_prefill)
            self._prefilled_on[attempt_key] = (prefilled_on, "local" if plan.prefill is None else "remote",
                                               time.monotonic())
        self.alarm.observe(hashes[0] if hashes else None, max(overlaps.values(), default=0))
        self.decisions.append({
            "at": time.time(), "decode": plan.decode.worker_id,
            "prefill": plan.prefill.worker_id if plan.prefill else None, "reason": plan.reason,
            "prompt_tokens": len(prompt_token_ids), "uncached_tokens": plan.num_uncached_tokens,
            "decode_overlap_blocks": plan.decode.overlap_blocks, "decode_reason": plan.decode.reason,
            **_ttft_fields(plan),
        })
        return plan, ranked

    def prefill_done(self, attempt_key: str) -> None:
        """The attempt's prefill is over (its first token arrived) or the attempt ended."""
        entry = self._prefilled_on.pop(attempt_key, None)
        if entry is None:
            return
        wid, path, routed_at = entry
        took = self.prefill_pending[path]
        took[0] += time.monotonic() - routed_at
        took[1] += 1
        if wid in self.workers:
            self.workers[wid].prefill_in_flight.pop(attempt_key, None)

    def _rate_prior(self, role: Role) -> float:
        return (self.config.prefill_rate_prior_tokens_per_s if role == Role.PREFILL
                else self.config.local_prefill_rate_prior_tokens_per_s)

    def actor(self, worker_id: str):
        return self.workers[worker_id].actor

    def silence_s(self, worker_id: str) -> float | None:
        """Seconds since the worker last showed progress: since its last answer to a poll, plus how
        long its engine had been stuck when it answered; None once it left the membership."""
        w = self.workers.get(worker_id)
        if w is None:
            return None
        return time.monotonic() - w.last_ok_at + (w.state.load.engine_stalled_s if w.state is not None else 0.0)

    def note_routed(self, worker_id: str, delta: int) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.num_routed += delta

    # -- polling -------------------------------------------------------------------------------
    async def _poll_forever(self) -> None:
        # One poll in flight per worker, each bounded by poll_timeout_s: a hung worker's poll
        # never delays the others' (their last_ok_at is what hang detection reads).
        while True:
            try:
                self._sync_membership()
                for w in list(self.workers.values()):
                    if w.poll_task is None or w.poll_task.done():
                        w.poll_task = asyncio.ensure_future(self._poll(w))
            except Exception:
                log.exception("router poll failed")
            await asyncio.sleep(self.poll_interval_s)

    def _sync_membership(self) -> None:
        members = {m.worker_id: m for m in self.watcher.members()}
        now = time.monotonic()
        for wid in list(self.workers):
            if wid not in members:
                if self._lapsed_but_answering(self.workers[wid], now):
                    continue
                log.info("worker %s left the cluster", wid)
                gone = self.workers.pop(wid)
                if gone.poll_task is not None:
                    gone.poll_task.cancel()
                self.index.remove_worker(wid)
                self.rates.forget(wid)
        for wid, info in members.items():
            if wid not in self.workers:
                try:
                    actor = ray.get_actor(info.actor_name, namespace=self.namespace)
                except ValueError:
                    continue  # registered but not (yet / any more) a live actor
                log.info("worker %s (%s) joined the cluster", wid, info.role.value)
                self.workers[wid] = WorkerEntry(info, actor, self.config.engine_stall_timeout_s)
            else:
                w = self.workers[wid]
                if w.left_etcd_at is not None:
                    log.info("worker %s registered again %.1f s after its registration lapsed", wid,
                             now - w.left_etcd_at)
                w.info, w.left_etcd_at = info, None

    def _lapsed_but_answering(self, w: WorkerEntry, now: float) -> bool:
        """Keep a worker whose registration lapsed while it answers polls (LAPSED_ANSWER_WITHIN_S)."""
        answering = not w.is_dead and now - w.last_ok_at < LAPSED_ANSWER_WITHIN_S
        if w.left_etcd_at is None:
            w.left_etcd_at = now
            if answering:
                log.warning("worker %s: its etcd registration lapsed but it answers polls; keeping it routable "
                            "for up to %.0f s while it registers again", w.info.worker_id, self.lapse_grace_s)
        return answering and now - w.left_etcd_at < self.lapse_grace_s

    async def _poll(self, w: WorkerEntry) -> None:
        sent_at, w.poll_window = time.monotonic(), dict(w.prefill_in_flight)
        try:
            state: WorkerState = await asyncio.wait_for(w.actor.state.remote(w.last_seq), self.poll_timeout_s)
        except Exception as e:
            w.poll_window = None
            w.num_poll_failures += 1
            w.is_dead = isinstance(e, RayActorError)
            if w.num_poll_failures in (1, 10):
                log.warning("worker %s did not answer its poll: %r", w.info.worker_id, e)
            return
        wid = w.info.worker_id
        if self.workers.get(wid) is not w:
            return  # it left while this poll was in flight: its index entries are gone, keep them so
        if state.events_complete:
            self.index.apply_all(state.events)
        else:
            self.index.reset_worker(wid, state.cached_hashes or (), state.last_seq)
        was_stalled = w.is_engine_stalled
        w.state, w.last_seq, w.blocks_since_poll, w.requests_since_poll = state, state.last_seq, 0, 0
        if w.is_engine_stalled != was_stalled:
            if was_stalled:
                log.info("worker %s: its engine moves again; back in routing", wid)
            else:
                log.warning("worker %s: its engine made no progress for %.1f s (%s; router.engine_stall_timeout_s "
                            "= %g); out of routing until it moves", wid, state.load.engine_stalled_s,
                            "requests in it" if state.load.engine_has_work else "no request in it",
                            w.engine_stall_timeout_s)
        # the answer counts some of this router's requests in its window (those still pending at the
        # worker when it answered), other routers' requests never: what it reports beyond the whole
        # window is theirs (a lower bound: the window may hold requests the answer no longer counts)
        window, w.poll_window = w.poll_window or {}, None
        w.others_pending = max(0, state.load.num_pending_prefill_tokens - sum(window.values()))
        w.num_poll_failures, w.last_ok_at, w.is_dead = 0, time.monotonic(), False
        c = state.counters  # the state was taken somewhere between sending and answering: the midpoint
        self.rates.observe(wid, (sent_at + w.last_ok_at) / 2, c.num_prompt_tokens - c.num_prompt_tokens_cached,
                           state.load.num_pending_prefill_tokens, self._rate_prior(w.info.role))

    # -- reporting -----------------------------------------------------------------------------
    def counters(self) -> dict[str, WorkerCounters]:
        return {wid: w.state.counters for wid, w in self.workers.items() if w.state is not None}

    def loads(self) -> dict[str, WorkerLoad]:
        return {wid: w.state.load for wid, w in self.workers.items() if w.state is not None}


def _ttft_fields(plan: RoutePlan) -> dict:
    """The two estimates of a ttft-mode decision, for /v1/routing/recent and the dashboard."""
    e = plan.ttft
    if e is None:
        return {}
    return {"ttft_local_s": round(e.local_s, 4), "ttft_remote_s": round(e.remote_s, 4),
            "local_pending_tokens": e.local_pending_tokens, "remote_pending_tokens": e.remote_pending_tokens,
            "local_free_blocks": e.local_free_blocks, "remote_because": e.remote_because,
            "local_rate_tokens_per_s": round(e.local_rate_tokens_per_s), "remote_rate_tokens_per_s":
            round(e.remote_rate_tokens_per_s)}
