"""LeaseTable: pin/renew/release/expiry, exactly-once reporting, the reaper thread."""

from __future__ import annotations

import threading

import pytest

from kv_transfer.errors import LeaseExpiredError, UnknownLeaseError
from kv_transfer.lease import LeaseTable
from kv_transfer.metrics import TransferMetrics


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table():
    clock = FakeClock()
    expired: list[str] = []
    return LeaseTable(on_expired=expired.append, clock=clock), clock, expired


def test_release_in_time_returns_the_blocks_once(table):
    leases, clock, expired = table
    leases.pin("a", [3, 4, 5], ttl_s=10)
    assert leases.num_pinned_blocks == 3 and leases.is_pinned("a")
    clock.now += 9.9
    assert leases.release("a") == (3, 4, 5)
    assert leases.num_pinned_blocks == 0 and expired == []
    with pytest.raises(UnknownLeaseError):  # a second release is a bug, not a silent no-op
        leases.release("a")


def test_reaper_expires_and_late_release_fails_loudly(table):
    leases, clock, expired = table
    leases.pin("a", [1], ttl_s=5)
    leases.pin("b", [2, 3], ttl_s=50)
    clock.now += 5
    assert leases.reap() == ["a"]
    assert expired == ["a"] and leases.num_pinned_blocks == 2
    with pytest.raises(LeaseExpiredError, match="'a'") as err:
        leases.release("a")
    assert err.value.request_id == "a"
    assert expired == ["a"], "a late release must not report the expiry twice"


def test_release_past_deadline_before_the_reaper_runs_expires_it_there(table):
    """The reaper may lag: a release after the deadline still fails, and the expiry is reported
    by the release itself (exactly once), so the caller frees the blocks."""
    leases, clock, expired = table
    leases.pin("a", [7, 8], ttl_s=1)
    clock.now += 1.5
    with pytest.raises(LeaseExpiredError):
        leases.release("a")
    assert expired == ["a"]
    assert leases.reap() == [] and expired == ["a"]
    assert leases.num_pinned_blocks == 0


def test_renew_extends_by_the_pinned_ttl(table):
    leases, clock, expired = table
    leases.pin("a", [1], ttl_s=10)
    clock.now += 8
    leases.renew("a")
    clock.now += 8  # 16 s after pinning, 8 after the renewal
    assert leases.reap() == []
    assert leases.release("a") == (1,)
    leases.pin("b", [2], ttl_s=1)
    clock.now += 2
    with pytest.raises(LeaseExpiredError):
        leases.renew("b")
    assert expired == ["b"]


def test_bad_pins_are_refused(table):
    leases, _, _ = table
    with pytest.raises(ValueError, match="ttl_s"):
        leases.pin("a", [1], ttl_s=0)
    leases.pin("a", [1], ttl_s=1)
    with pytest.raises(ValueError, match="already"):
        leases.pin("a", [2], ttl_s=1)


def test_reaper_thread_reports_expiry_and_counts_it():
    reported = threading.Event()
    metrics = TransferMetrics("lease-test", "nixl")
    leases = LeaseTable(on_expired=lambda rid: reported.set(), metrics=metrics, reap_interval_s=0.01)
    leases.start()
    try:
        leases.pin("x", [1, 2], ttl_s=0.02)
        assert reported.wait(10), "the reaper thread never reported the expired lease"
        assert leases.num_pinned_blocks == 0
        fam = metrics._fam
        assert fam.leases_expired.labels("lease-test")._value.get() == 1
        assert fam.pinned_blocks.labels("lease-test")._value.get() == 0
    finally:
        leases.stop()


def test_a_failing_callback_does_not_kill_the_reaper(table):
    clock = FakeClock()
    calls = []

    def boom(rid):
        calls.append(rid)
        raise RuntimeError("engine busy")

    leases = LeaseTable(on_expired=boom, clock=clock)
    leases.pin("a", [1], ttl_s=1)
    leases.pin("b", [2], ttl_s=1)
    clock.now += 1
    assert sorted(leases.reap()) == ["a", "b"]
    assert sorted(calls) == ["a", "b"]
