"""The etcd registry against a real etcd 3.4: registration lifecycle, lease expiry, outages,
watch resync, readiness, cluster isolation, control-plane keys, TLS and auth."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aetcd
import pytest

from cluster.config import EtcdConfig
from cluster.etcd_client import EtcdConfigError, EtcdConnector, EtcdUnavailableError
from cluster.etcd_server import EtcdNotInstalledError, EtcdServerTLS, LocalEtcd, find_etcd_binary, pick_free_port
from cluster.keys import ClusterKeys, decode_worker_info, encode_worker_info
from cluster.registry import ControlState, MembershipWatcher, WorkerRegistration
from tests.cluster.conftest import TcpProxy, enable_etcd_auth, eventually, make_worker_info
from workers.protocol import Role

TTL_S = 2  # etcd's smallest lease with default election timing


def ids(watcher: MembershipWatcher, role=None) -> set[str]:
    return {m.worker_id for m in watcher.members(role)}


async def raw_get(etcd: LocalEtcd, key: str):
    async with aetcd.Client(host=etcd.host, port=etcd.client_port, timeout=5) as client:
        return await client.get(key.encode())


@pytest.fixture
async def registry(local_etcd, cluster_name):
    """registry.register(info) / registry.watcher(): started objects, all stopped at teardown."""

    class Registry:
        config = local_etcd.etcd_config(lease_ttl_s=TTL_S)
        registrations: list[WorkerRegistration] = []
        watchers: list[MembershipWatcher] = []

        async def register(self, info, config=None, wait=True) -> WorkerRegistration:
            reg = WorkerRegistration(config or self.config, cluster_name, info)
            await reg.start()
            self.registrations.append(reg)
            if wait:
                assert await reg.wait_registered(10), reg.last_error
            return reg

        async def watcher(self, config=None, name=None) -> MembershipWatcher:
            watcher = MembershipWatcher(config or self.config, name or cluster_name)
            await watcher.start()
            self.watchers.append(watcher)
            return watcher

    r = Registry()
    yield r
    for reg in r.registrations:
        await reg.deregister(timeout_s=2)
    for watcher in r.watchers:
        await watcher.stop()


async def test_register_appears_then_deregister_removes_at_once(registry, local_etcd, cluster_name):
    watcher = await registry.watcher()
    assert await watcher.wait_synced(10)
    changes = []
    watcher.add_listener(changes.append)
    info = make_worker_info("p0", Role.PREFILL)
    reg = await registry.register(info)

    await eventually(lambda: ids(watcher) == {"p0"}, what="p0 in membership")
    assert watcher.members(Role.PREFILL) == [info]
    assert watcher.members(Role.DECODE) == []
    raw = await raw_get(local_etcd, f"/pdserve/{cluster_name}/workers/prefill/p0")
    assert decode_worker_info(raw.value) == info
    assert raw.lease == reg.lease_id and reg.is_registered and reg.num_reregistrations == 0

    assert await reg.deregister() is True
    assert await raw_get(local_etcd, reg.key) is None  # gone when deregister returns, not at expiry
    await eventually(lambda: ids(watcher) == set(), what="p0 removed")
    assert [(c.kind, c.name) for c in changes] == [("put", "prefill/p0"), ("delete", "prefill/p0")]
    assert changes[-1].value == info  # a delete carries the last known info


async def test_hung_worker_expires_within_ttl(registry, local_etcd):
    watcher = await registry.watcher()
    reg = await registry.register(make_worker_info("d-hung", Role.DECODE))
    await eventually(lambda: ids(watcher) == {"d-hung"}, what="registered")

    await reg.stop_refreshing()  # a hung worker: no keepalive, no delete
    assert await raw_get(local_etcd, reg.key) is not None  # still there: only the lease removes it
    await eventually(lambda: ids(watcher) == set(), timeout_s=TTL_S + 5, what="removal by lease expiry")
    assert await raw_get(local_etcd, reg.key) is None


async def test_lost_lease_reregisters(registry, local_etcd):
    watcher = await registry.watcher()
    reg = await registry.register(make_worker_info("p-lost"))
    old_lease = reg.lease_id
    async with aetcd.Client(host=local_etcd.host, port=local_etcd.client_port, timeout=5) as client:
        await client.revoke_lease(old_lease)  # what an expiry during an outage looks like to the worker

    await eventually(lambda: reg.num_reregistrations == 1, what="re-registration after the lease was lost")
    assert reg.lease_id != old_lease and reg.is_registered
    assert (await raw_get(local_etcd, reg.key)).lease == reg.lease_id
    await eventually(lambda: ids(watcher) == {"p-lost"}, what="back in membership")


async def test_update_info_rewrites_the_value_under_the_same_lease(registry, local_etcd):
    watcher = await registry.watcher()
    info = make_worker_info("p-grow", kv_capacity_blocks=64)
    reg = await registry.register(info)
    await eventually(lambda: watcher.member("p-grow") == info, what="registered")
    lease_id = reg.lease_id
    await reg.update_info(dataclasses.replace(info, kv_capacity_blocks=128))
    await eventually(lambda: watcher.member("p-grow").kv_capacity_blocks == 128, what="update seen")
    assert (await raw_get(local_etcd, reg.key)).lease == lease_id == reg.lease_id
    with pytest.raises(ValueError, match="cannot change worker_id or role"):
        await reg.update_info(dataclasses.replace(info, role=Role.DECODE))


async def test_put_if_absent_never_overwrites_another_incarnation(registry, local_etcd):
    first = await registry.register(make_worker_info("dup", started_at=1.0))
    second = await registry.register(make_worker_info("dup", started_at=2.0, model="other"), wait=False)
    await eventually(lambda: second.last_error is not None and "another live process" in second.last_error,
                     what="conflict reported")
    assert not second.is_registered
    assert decode_worker_info((await raw_get(local_etcd, first.key)).value).started_at == 1.0

    await first.stop_refreshing()  # the old incarnation dies; its lease expires; the new one takes the key
    assert await second.wait_registered(TTL_S + 10), second.last_error
    assert decode_worker_info((await raw_get(local_etcd, first.key)).value).model == "other"


async def test_watcher_resyncs_after_disconnect_and_misses_no_delete(registry, local_etcd, tcp_proxy_to):
    proxy: TcpProxy = await tcp_proxy_to(local_etcd)
    watcher = await registry.watcher(config=EtcdConfig(endpoints=[proxy.endpoint], lease_ttl_s=TTL_S))
    changes = []
    watcher.add_listener(changes.append)
    a = await registry.register(make_worker_info("a", Role.DECODE))
    await registry.register(make_worker_info("b", Role.PREFILL))
    await eventually(lambda: ids(watcher) == {"a", "b"}, what="a and b seen")

    await proxy.cut()  # the watcher alone loses etcd; etcd and the workers carry on
    await eventually(lambda: not watcher.is_connected, what="watcher notices the cut")
    assert await a.deregister()
    await registry.register(make_worker_info("c", Role.DECODE))
    async with aetcd.Client(host=local_etcd.host, port=local_etcd.client_port, timeout=5) as client:
        revision = (await client.get_prefix(b"/")).header.revision
        await client.compact(revision)  # resuming the old watch revision would now be impossible
    assert ids(watcher) == {"a", "b"}  # last known membership kept while disconnected
    assert watcher.is_ready(1, 1)[0]

    await proxy.restore()
    await eventually(lambda: watcher.is_connected and ids(watcher) == {"b", "c"}, what="resync after reconnect")
    assert ("delete", "decode/a") in [(c.kind, c.name) for c in changes]
    assert watcher.num_resyncs >= 1


async def test_etcd_outage_keeps_membership_and_recovers(tmp_path, cluster_name):
    etcd = LocalEtcd(tmp_path / "outage").start()
    config = etcd.etcd_config(lease_ttl_s=TTL_S)
    watcher = MembershipWatcher(config, cluster_name)
    await watcher.start()
    steady = WorkerRegistration(config, cluster_name, make_worker_info("steady", Role.PREFILL))
    hung = WorkerRegistration(config, cluster_name, make_worker_info("hung", Role.DECODE))
    late = WorkerRegistration(config, cluster_name, make_worker_info("late", Role.DECODE))
    try:
        for reg in (steady, hung):
            await reg.start()
            assert await reg.wait_registered(10), reg.last_error
        await eventually(lambda: ids(watcher) == {"steady", "hung"}, what="both registered")

        etcd.stop()
        stopped_at = time.monotonic()
        await eventually(lambda: not watcher.is_connected, what="watcher notices the outage")
        assert ids(watcher) == {"steady", "hung"}
        ready, reason = watcher.is_ready(1, 1)
        assert ready and "etcd unreachable" in reason, reason
        await hung.stop_refreshing()  # hangs during the outage: must be gone after recovery
        await late.start()  # starts during the outage: must register after recovery
        await eventually(lambda: late.last_error is not None and not steady.is_etcd_reachable, what="errors seen")
        assert not late.is_registered and steady.is_registered  # nobody crashed; keys presumed kept
        await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - stopped_at)))

        etcd.start()
        restarted_at = time.time()
        await eventually(lambda: watcher.is_connected and ids(watcher) == {"steady", "late"}, timeout_s=20,
                         what="resync: late added, hung expired")
        assert late.is_registered
        await eventually(lambda: (steady.last_refresh_at or 0) > restarted_at, what="steady refreshes again")
        raw = await raw_get(etcd, steady.key)
        assert raw is not None and raw.lease == steady.lease_id
    finally:
        for reg in (steady, hung, late):
            await reg.deregister(timeout_s=2)
        await watcher.stop()
        etcd.stop()


async def test_readiness_message(registry, local_etcd):
    watcher = await registry.watcher()
    assert await watcher.wait_synced(10)
    assert watcher.is_ready(1, 1) == (False, "waiting for workers: 0/1 prefill, 0/1 decode registered")
    await registry.register(make_worker_info("d0", Role.DECODE))
    await eventually(lambda: ids(watcher) == {"d0"}, what="d0")
    assert watcher.is_ready(1, 1) == (False, "waiting for workers: 0/1 prefill, 1/1 decode registered")
    assert watcher.is_ready(0, 1) == (True, "ready: 0/0 prefill, 1/1 decode registered")
    await registry.register(make_worker_info("p0", Role.PREFILL))
    await eventually(lambda: ids(watcher) == {"d0", "p0"}, what="p0")
    assert watcher.is_ready(1, 1) == (True, "ready: 1/1 prefill, 1/1 decode registered")


async def test_unreachable_etcd_never_raises(cluster_name):
    dead = EtcdConfig(endpoints=[f"127.0.0.1:{pick_free_port()}"], lease_ttl_s=TTL_S)
    reg = WorkerRegistration(dead, cluster_name, make_worker_info("lonely"))
    watcher = MembershipWatcher(dead, cluster_name)
    await reg.start()
    await watcher.start()
    try:
        await eventually(lambda: reg.last_error is not None and watcher.last_error is not None, what="errors")
        assert not reg.is_registered and not reg._task.done()  # still retrying, not crashed
        ready, reason = watcher.is_ready(0, 1)
        assert not ready and reason.startswith(f"waiting for etcd at {dead.endpoints[0]}"), reason
    finally:
        assert await reg.deregister(timeout_s=1) is False  # reports it could not reach etcd
        await watcher.stop()


async def test_clusters_never_mix(local_etcd, cluster_name):
    config = local_etcd.etcd_config(lease_ttl_s=TTL_S)
    other_name = cluster_name + "x"  # "t-abc" is a string prefix of "t-abcx": keys must still not mix
    regs = [
        WorkerRegistration(config, cluster_name, make_worker_info("w0", model="mine")),
        WorkerRegistration(config, other_name, make_worker_info("w0", model="theirs")),
    ]
    watchers = [MembershipWatcher(config, cluster_name), MembershipWatcher(config, other_name)]
    mine, theirs = ControlState(config, cluster_name), ControlState(config, other_name)
    try:
        for obj in regs + watchers:
            await obj.start()
        for reg in regs:
            assert await reg.wait_registered(10), reg.last_error
        await eventually(lambda: all(len(w.members()) == 1 for w in watchers), what="one worker each")
        assert [w.members()[0].model for w in watchers] == ["mine", "theirs"]

        await mine.set_drain("w0", "maintenance")
        await mine.set_kv_quota("w0", 128)
        assert await theirs.get_drain("w0") is None and await theirs.list_kv_quotas() == {}

        await regs[1].deregister()
        await eventually(lambda: watchers[1].members() == [], what="theirs removed")
        assert [m.model for m in watchers[0].members()] == ["mine"]
    finally:
        for reg in regs:
            await reg.deregister(timeout_s=2)
        for watcher in watchers:
            await watcher.stop()
        await mine.close()
        await theirs.close()


async def test_control_state_drain_and_kv_quota(local_etcd, cluster_name):
    state = ControlState(local_etcd.etcd_config(), cluster_name)
    mirror = state.drain_mirror()
    await mirror.start()
    try:
        assert await mirror.wait_synced(10) and mirror.items() == {}
        flag = await state.set_drain("d1", "scale down")
        assert await state.get_drain("d1") == flag and (await state.list_drains()) == {"d1": flag}
        await eventually(lambda: mirror.get("d1") == flag, what="mirror sees the drain flag")
        assert await state.clear_drain("d1") is True and await state.clear_drain("d1") is False
        await eventually(lambda: mirror.items() == {}, what="mirror sees the flag cleared")

        await state.set_kv_quota("p1", 256)
        await state.set_kv_quota("p2", 0)
        assert await state.get_kv_quota("p1") == 256 and await state.list_kv_quotas() == {"p1": 256, "p2": 0}
        assert await state.clear_kv_quota("p1") and await state.get_kv_quota("p1") is None
        with pytest.raises(ValueError, match="num_blocks"):
            await state.set_kv_quota("p1", -1)
        with pytest.raises(ValueError, match="without '/'"):
            await state.set_drain("a/b")
    finally:
        await mirror.stop()
        await state.close()


def test_thread_runner_for_sync_callers(local_etcd, cluster_name):
    config = local_etcd.etcd_config(lease_ttl_s=TTL_S)
    watcher = MembershipWatcher(config, cluster_name)
    reg = WorkerRegistration(config, cluster_name, make_worker_info("sync-worker", Role.DECODE))
    watcher.start_in_thread()
    reg.start_in_thread()
    try:
        assert watcher.wait_synced_sync(10)
        assert reg.wait_registered_sync(10), reg.last_error
        deadline = time.monotonic() + 10
        while ids(watcher) != {"sync-worker"} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ids(watcher) == {"sync-worker"}
        assert reg.stop_in_thread(deregister=True) is True
        while ids(watcher) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ids(watcher) == set()
    finally:
        watcher.stop_in_thread()


async def test_tls_with_client_certificates(tmp_path, tls_files, cluster_name):
    tls = EtcdServerTLS(cert_file=tls_files.server_cert, key_file=tls_files.server_key,
                        trusted_ca_file=tls_files.ca_cert, client_cert_auth=True)
    with LocalEtcd(tmp_path / "tls", tls=tls) as etcd:
        assert etcd.client_url.startswith("https://")
        good = etcd.etcd_config(lease_ttl_s=TTL_S, ca_cert=tls_files.ca_cert,
                                client_cert=tls_files.client_cert, client_key=tls_files.client_key)
        rogue = etcd.etcd_config(ca_cert=tls_files.ca_cert, client_cert=tls_files.rogue_client_cert,
                                 client_key=tls_files.rogue_client_key)
        no_cert = etcd.etcd_config(ca_cert=tls_files.ca_cert)
        plaintext = etcd.etcd_config()
        watcher = MembershipWatcher(good, cluster_name)
        reg = WorkerRegistration(good, cluster_name, make_worker_info("tls-worker"))
        refused = [MembershipWatcher(cfg, cluster_name) for cfg in (rogue, no_cert, plaintext)]
        for obj in [watcher, reg, *refused]:
            await obj.start()
        try:
            assert await reg.wait_registered(10), reg.last_error
            await eventually(lambda: ids(watcher) == {"tls-worker"}, what="member seen over TLS")
            await eventually(lambda: all(w.last_error for w in refused), what="refused clients report errors")
            assert not any(w.is_synced for w in refused)
        finally:
            await reg.deregister(timeout_s=2)
            for w in [watcher, *refused]:
                await w.stop()


async def test_auth_user_confined_to_its_cluster_and_survives_restart(tmp_path, cluster_name):
    with LocalEtcd(tmp_path / "auth") as etcd:
        await enable_etcd_auth(etcd, root_password="root-pw", user="pdserve", password="s3cret",
                               key_prefix=ClusterKeys(cluster_name).prefix)
        config = etcd.etcd_config(lease_ttl_s=TTL_S, user="pdserve", password="s3cret")
        watcher = MembershipWatcher(config, cluster_name)
        reg = WorkerRegistration(config, cluster_name, make_worker_info("authed"))
        wrong = MembershipWatcher(etcd.etcd_config(user="pdserve", password="nope"), cluster_name)
        anonymous = MembershipWatcher(etcd.etcd_config(), cluster_name)
        elsewhere = ControlState(config, cluster_name + "-other")
        for obj in (watcher, reg, wrong, anonymous):
            await obj.start()
        try:
            assert await reg.wait_registered(10), reg.last_error
            await eventually(lambda: ids(watcher) == {"authed"}, what="member seen with auth")
            await eventually(lambda: wrong.last_error and anonymous.last_error, what="bad credentials refused")
            assert "authentication" in wrong.last_error and not wrong.is_synced and not anonymous.is_synced
            with pytest.raises(EtcdUnavailableError, match="permission denied"):
                await elsewhere.set_drain("w0")  # the user may not touch another cluster's keys

            etcd.stop()  # auth tokens do not survive a restart: clients must log in again
            await eventually(lambda: not watcher.is_connected, what="outage noticed")
            etcd.start()
            restarted_at = time.time()
            await eventually(lambda: watcher.is_connected and (reg.last_refresh_at or 0) > restarted_at,
                             timeout_s=20, what="re-authenticated after restart")
            assert ids(watcher) == {"authed"}
        finally:
            await reg.deregister(timeout_s=2)
            for w in (watcher, wrong, anonymous):
                await w.stop()
            await elsewhere.close()


def test_connector_errors_name_the_setting(tmp_path):
    with pytest.raises(EtcdConfigError, match="etcd.endpoints is empty"):
        EtcdConnector(EtcdConfig())
    with pytest.raises(EtcdConfigError, match="etcd.ca_cert: cannot read"):
        EtcdConnector(EtcdConfig(endpoints=["127.0.0.1:2379"], ca_cert=tmp_path / "missing.pem"))


def test_missing_etcd_binary_says_what_to_install(monkeypatch):
    assert find_etcd_binary()  # this machine has it (the suite needs it)
    monkeypatch.setattr("cluster.etcd_server.os.access", lambda *a: False)
    with pytest.raises(EtcdNotInstalledError, match="apt-get install etcd-server"):
        find_etcd_binary()


async def test_malformed_entries_are_ignored_not_fatal(registry, local_etcd, cluster_name):
    workers = ClusterKeys(cluster_name).workers_prefix
    async with aetcd.Client(host=local_etcd.host, port=local_etcd.client_port, timeout=5) as client:
        await client.put(f"{workers}prefill/garbage".encode(), b"{not json")
        mislabeled = make_worker_info("real-id", Role.DECODE)
        await client.put(f"{workers}prefill/other-id".encode(), encode_worker_info(mislabeled))
    watcher = await registry.watcher()
    await registry.register(make_worker_info("good"))
    await eventually(lambda: ids(watcher) == {"good"}, what="only the valid worker")
    assert watcher.is_connected
