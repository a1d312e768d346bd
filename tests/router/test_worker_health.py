"""The router's health rule for a worker (ClusterView, WorkerEntry.is_healthy): a slow engine step is
not a dead worker, an engine that makes no progress for router.engine_stall_timeout_s is (out of
routing and readiness, and silent for the stream watchdog), and polls that go unanswered still
count as before. Worker actors are in-process doubles answering state(); no Ray, no etcd (the
view is never started)."""

import time

from cluster.config import EtcdConfig
from router.cluster_view import MAX_POLL_FAILURES, ClusterView, WorkerEntry
from router.config import RouterConfig
from workers.protocol import Role, WorkerCounters, WorkerInfo, WorkerLoad, WorkerState

STALL_TIMEOUT_S = 10.0


class _StateCall:
    def __init__(self, worker):
        self.worker = worker

    async def remote(self, since_seq):
        if self.worker.fails:
            raise TimeoutError("no answer")
        return self.worker.answer()


class WorkerDouble:
    """Answers the router's poll at once, reporting the engine heartbeat age it is given."""

    def __init__(self, worker_id: str, role: Role):
        self.worker_id, self.role = worker_id, role
        self.stalled_s, self.fails = 0.0, False
        self.state = _StateCall(self)

    def answer(self) -> WorkerState:
        load = WorkerLoad(self.worker_id, self.role, 1, 0, 4, 512, engine_stalled_s=self.stalled_s,
                          engine_has_work=True)
        return WorkerState(load, (), True, None, -1, WorkerCounters())


def make_view(*decode_ids: str):
    config = RouterConfig(policy="round_robin", engine_stall_timeout_s=STALL_TIMEOUT_S, min_prefill_workers=0)
    view = ClusterView("t", EtcdConfig(endpoints=["127.0.0.1:1"]), config, block_size=16)
    doubles = {}
    for wid in decode_ids:
        doubles[wid] = WorkerDouble(wid, Role.DECODE)
        info = WorkerInfo(wid, Role.DECODE, wid, "127.0.0.1", "m", 512, "h", time.time())
        view.workers[wid] = WorkerEntry(info, doubles[wid], config.engine_stall_timeout_s)
    return view, doubles


async def poll_all(view):
    for w in view.workers.values():
        await view._poll(w)


def test_the_default_stall_timeout_outlasts_a_slow_cpu_step():
    config = RouterConfig()
    assert config.engine_stall_timeout_s == 10 and config.poll_timeout_s == 2


async def test_a_slow_step_keeps_the_worker_routable_and_a_stuck_engine_takes_it_out():
    view, doubles = make_view("d1", "d2")
    doubles["d1"].stalled_s = 6.0  # inside a long step: its poll still answered
    await poll_all(view)
    assert view.workers["d1"].is_healthy and view.is_ready()[0]
    assert view.silence_s("d1") >= 6.0  # a stream on it has been silent that long, too
    assert {view.plan(list(range(64)), None, f"r{i}")[0].decode.worker_id for i in range(4)} == {"d1", "d2"}

    doubles["d1"].stalled_s = STALL_TIMEOUT_S  # stuck
    await poll_all(view)
    d1 = view.workers["d1"]
    assert d1.is_engine_stalled and not d1.is_healthy and d1.num_poll_failures == 0
    assert view.silence_s("d1") >= STALL_TIMEOUT_S
    assert {view.plan(list(range(64)), None, f"s{i}")[0].decode.worker_id for i in range(4)} == {"d2"}
    assert view.is_ready()[0]  # d2 is enough

    doubles["d2"].stalled_s = 30.0
    await poll_all(view)
    assert not view.is_ready()[0]  # no healthy decode worker left

    doubles["d1"].stalled_s = doubles["d2"].stalled_s = 0.01  # moving again
    await poll_all(view)
    assert all(w.is_healthy for w in view.workers.values()) and view.is_ready()[0]
    assert view.silence_s("d1") < 1


async def test_unanswered_polls_still_take_a_worker_out_with_a_fresh_engine():
    view, doubles = make_view("d1")
    await poll_all(view)
    d1 = view.workers["d1"]
    assert d1.is_healthy
    doubles["d1"].fails = True
    for _ in range(MAX_POLL_FAILURES - 1):
        await view._poll(d1)
    assert d1.is_healthy  # a slow poll or two is not a dead worker
    await view._poll(d1)
    assert not d1.is_healthy and not d1.is_engine_stalled
    doubles["d1"].fails = False
    await view._poll(d1)
    assert d1.is_healthy


def test_a_worker_that_never_answered_is_not_healthy():
    info = WorkerInfo("d1", Role.DECODE, "d1", "127.0.0.1", "m", 512, "h", time.time())
    assert not WorkerEntry(info, None, STALL_TIMEOUT_S).is_healthy
