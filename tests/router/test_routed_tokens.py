"""ClusterView's own count of the prompt tokens it routed to each worker for prefill and whose first
token has not come back (a burst between two polls must not all go to one side, and a worker that
finished a prompt is free again before its next poll), and the prefill rates it learns from polls.
The worker actors are in-process doubles answering state(); no Ray, no etcd (the view is never
started)."""

import asyncio
import time

from cluster.config import EtcdConfig
from router.cluster_view import ClusterView, WorkerEntry
from router.config import RouterConfig
from workers.protocol import Role, WorkerCounters, WorkerInfo, WorkerLoad, WorkerState


class _StateCall:
    def __init__(self, worker):
        self.worker = worker

    def remote(self, since_seq):
        return self.worker.answer()


class WorkerDouble:
    """Answers the router's poll with the load it is given; ``during_poll`` runs while the poll
    is in flight (after it was sent, before the answer)."""

    def __init__(self, worker_id: str, role: Role):
        self.worker_id, self.role = worker_id, role
        self.pending, self.num_prompt_tokens = 0, 0
        self.during_poll = None
        self.state = _StateCall(self)

    async def answer(self) -> WorkerState:
        if self.during_poll is not None:
            self.during_poll()
            self.during_poll = None
        await asyncio.sleep(0)
        load = WorkerLoad(self.worker_id, self.role, 0, 0, 0, 512, num_pending_prefill_tokens=self.pending)
        return WorkerState(load, (), True, None, -1, WorkerCounters(num_prompt_tokens=self.num_prompt_tokens))


def make_view(local_cap_tokens: int = 4096):
    config = RouterConfig(policy="kv_aware", conditional_disaggregation="ttft", local_prefill_threshold_tokens=0,
                          prefill_rate_prior_tokens_per_s=4000, local_prefill_rate_prior_tokens_per_s=2000,
                          local_prefill_max_pending_tokens=local_cap_tokens, ttft_transfer_allowance_s=0.01)
    # an endpoint that is never dialled: the view is not started
    view = ClusterView("t", EtcdConfig(endpoints=["127.0.0.1:1"]), config, block_size=16)
    doubles = {}
    for wid, role in (("d1", Role.DECODE), ("p1", Role.PREFILL)):
        doubles[wid] = WorkerDouble(wid, role)
        info = WorkerInfo(wid, role, wid, "127.0.0.1", "m", 512, "h", time.time())
        view.workers[wid] = WorkerEntry(info, doubles[wid], config.engine_stall_timeout_s)
    return view, doubles


def pending(view, wid: str) -> int:
    return view.workers[wid].load().num_pending_prefill_tokens


async def test_a_burst_between_polls_is_split_between_the_two_paths():
    view, doubles = make_view()
    for w in view.workers.values():
        await view._poll(w)  # both idle
    prompt = list(range(512))
    reasons = [view.plan(prompt, f"salt-{i}", f"r{i}")[0].reason for i in range(3)]
    # 1: remote 512/4000 + 0.01 = 0.138 s < local 512/2000 = 0.256 s
    # 2: p1 has 512 routed-but-unreported tokens: remote 0.266 s > local 0.256 s
    # 3: d1 now has 512 too: local 0.512 s > remote 0.266 s
    assert reasons == ["disaggregated", "ttft_local", "disaggregated"]
    assert (pending(view, "p1"), pending(view, "d1")) == (1024, 512)
    decision = view.decisions[-1]
    assert decision["ttft_remote_s"] == 0.266 and decision["ttft_local_s"] == 0.512
    assert decision["remote_pending_tokens"] == 1024 and decision["local_rate_tokens_per_s"] == 2000


async def test_a_first_token_frees_the_worker_before_its_next_poll():
    """The decode worker's local prompt stops counting when its first token comes back: the next
    prompt may stay local at once (before: it counted until a poll sent after it answered)."""
    view, doubles = make_view(local_cap_tokens=512)  # one prompt at a time on d1
    for w in view.workers.values():
        await view._poll(w)
    prompt = list(range(512))
    view.plan(prompt, "a", "ra")  # remote (faster)
    assert view.plan(prompt, "b", "rb")[0].reason == "ttft_local"
    assert view.plan(prompt, "c", "rc")[0].reason == "disaggregated"  # d1 is at its cap
    view.prefill_done("rb")  # rb's first token
    assert pending(view, "d1") == 0
    assert view.plan(prompt, "d", "rd")[0].reason == "ttft_local"
    view.prefill_done("rb")  # again (the attempt's end): nothing more is taken off
    assert (pending(view, "d1"), pending(view, "p1")) == (512, 1024)
    view.prefill_done("unknown")
    # how long each path's prompts counted as pending (/metrics): rb once, local; none remote yet
    (local_s, local_n), (remote_s, remote_n) = view.prefill_pending["local"], view.prefill_pending["remote"]
    assert (local_n, remote_n, remote_s) == (1, 0, 0.0) and local_s > 0
    time.sleep(0.02)
    view.prefill_done("ra")
    assert view.prefill_pending["remote"][1] == 1 and view.prefill_pending["remote"][0] >= 0.02


async def test_a_poll_counts_only_what_other_routers_sent_beyond_this_ones_requests():
    view, doubles = make_view(local_cap_tokens=0)  # every prompt to p1
    p1 = view.workers["p1"]
    for w in view.workers.values():
        await view._poll(w)
    prompt = list(range(512))
    view.plan(prompt, "a", "ra")  # before the poll: the worker's answer counts it
    doubles["p1"].pending = 512
    doubles["p1"].during_poll = lambda: view.plan(prompt, "b", "rb")  # routed while the poll is in flight
    await view._poll(p1)
    assert pending(view, "p1") == 512 + 512  # ra and rb, each once
    view.prefill_done("ra")
    doubles["p1"].pending = 512 + 1000  # rb, and 1000 tokens another router sent
    await view._poll(p1)
    assert pending(view, "p1") == 512 + 1000
    view.prefill_done("rb")
    assert pending(view, "p1") == 1000  # until the next poll says otherwise
    doubles["p1"].pending = 0
    await view._poll(p1)
    assert pending(view, "p1") == 0
    assert not view._prefilled_on and not p1.prefill_in_flight


async def test_polls_of_a_busy_worker_teach_the_view_its_rate():
    view, doubles = make_view()
    p1, d = view.workers["p1"], doubles["p1"]
    d.pending = 1000
    await view._poll(p1)
    for _ in range(5):
        await asyncio.sleep(0.05)
        d.num_prompt_tokens += 100  # ~2000 tokens/s, well under the 4000 prior
        await view._poll(p1)
    rate = view.rates.rate("p1", 4000)
    assert rate.is_measured and rate.tokens_per_s < 4000
