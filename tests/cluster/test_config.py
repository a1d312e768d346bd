"""PdserveConfig: defaults as planned, YAML round trip, overrides, env token, and errors that name
the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import (
    ADMIN_TOKEN_ENV,
    ConfigError,
    EtcdConfig,
    PdserveConfig,
    config_to_yaml,
    load_config,
    parse_endpoint,
)


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pdserve.yaml"
    path.write_text(text)
    return path


def error_of(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_match_the_plan():
    c = load_config(None)
    assert c.cluster_name == "default"
    assert (c.model.path, c.model.dtype, c.model.device) == (None, "auto", "auto")
    assert (c.engine.block_size, c.engine.num_kv_blocks, c.engine.max_num_batched_tokens) == (16, 512, 512)
    for pool in (c.pools.prefill, c.pools.decode):
        assert (pool.replicas, pool.min_replicas, pool.max_replicas, pool.num_cpus, pool.num_gpus) == (1, 1, 4, 0.25, 0)
    assert (c.router.policy, c.router.local_prefill_threshold_tokens) == ("cache_aware", 32)
    assert (c.etcd.endpoints, c.etcd.lease_ttl_s, c.etcd.use_tls) == ([], 10, False)
    assert (c.transfer.backend, c.transfer.lease_ttl_s) == ("nixl", 30)
    assert (c.server.host, c.server.port, c.server.admin_port, c.server.admin_token) == ("127.0.0.1", 8000, 8001, None)
    assert c.limits.max_concurrent_requests == 256
    assert not c.autoscaling.enabled and not c.kv_quota.enabled
    q = c.kv_quota
    assert (q.budget_fraction, q.memory_high_percent, q.memory_low_percent) == (0.3, 90.0, 80.0)


def test_yaml_round_trip(tmp_path):
    path = write(tmp_path, """
cluster_name: prod-1
model: {path: /models/smol, served_model_name: smol, dtype: bfloat16, device: cuda}
engine: {block_size: 32, num_kv_blocks: 1024}
pools:
  prefill: {replicas: 2, max_replicas: 8, num_gpus: 1, resources: {pdserve_prefill: 0.01}}
  decode: {replicas: 3, min_replicas: 2, max_replicas: 6}
router: {policy: round_robin, overlap_weight: 2.5}
etcd:
  endpoints: ["etcd-0:2379", "https://etcd-1:2379"]
  lease_ttl_s: 30
  ca_cert: /etc/pdserve/ca.pem
  client_cert: /etc/pdserve/client.pem
  client_key: /etc/pdserve/client-key.pem
  user: pdserve
  password: hunter2
transfer: {backend: tcp, deadline_s: 5}
server: {port: 9000, admin_port: 9001, admin_token: tok-123}
limits: {max_tokens: 100}
autoscaling: {enabled: true, cooldown_s: 30}
kv_quota: {enabled: true, node_kv_budget_bytes: 1000000}
""")
    first = load_config(path)
    assert first.pools.prefill.resources == {"pdserve_prefill": 0.01}
    assert first.etcd.use_tls and first.etcd.password.get_secret_value() == "hunter2"
    assert first.server.admin_token.get_secret_value() == "tok-123"

    again = load_config(write(tmp_path, config_to_yaml(first, reveal_secrets=True)))
    assert again == first
    masked = config_to_yaml(first)
    assert "hunter2" not in masked and "tok-123" not in masked and "hunter2" not in repr(first)


def test_overrides_use_dotted_keys(tmp_path):
    path = write(tmp_path, "pools: {prefill: {replicas: 1}}\n")
    c = load_config(path, {"pools.prefill.replicas": 2, "server.port": 8100, "model.path": "/m"})
    assert (c.pools.prefill.replicas, c.server.port, c.model.path) == (2, 8100, "/m")
    assert "pools.prefill.replicaz: unknown key" in error_of(path, {"pools.prefill.replicaz": 2})
    assert "server.port is a value, not a section" in error_of(write(tmp_path, "server: {port: 80}\n"), {"server.port.x": 1})
    assert "server.port: Input should be a valid integer" in error_of(None, {"server.port.x": 1})


def test_admin_token_from_env_only_when_unset(tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-env")
    assert load_config(None).server.admin_token.get_secret_value() == "from-env"
    path = write(tmp_path, "server: {admin_token: from-file}\n")
    assert load_config(path).server.admin_token.get_secret_value() == "from-file"


def test_api_keys_from_env_only_when_unset(tmp_path, monkeypatch):
    """PDSERVE_API_KEY (comma-separated) fills server.api_keys when the file does not set them; an
    empty key is an error (it would let every request in); the keys never print."""
    monkeypatch.setenv("PDSERVE_API_KEY", "k1, k2,")
    assert [k.get_secret_value() for k in load_config(None).server.api_keys] == ["k1", "k2"]
    path = write(tmp_path, "server: {api_keys: [from-file]}\n")
    assert [k.get_secret_value() for k in load_config(path).server.api_keys] == ["from-file"]
    assert "from-file" not in config_to_yaml(load_config(path))
    monkeypatch.delenv("PDSERVE_API_KEY")
    assert load_config(None).server.api_keys == []
    message = error_of(write(tmp_path, "server: {api_keys: ['  ']}\n"))
    assert "server.api_keys" in message and "must not be empty" in message


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("clusterName: x\n", "clusterName: unknown key (allowed: cluster_name, model, engine"),
        ("pools: {prefill: {replica: 2}}\n", "pools.prefill.replica: unknown key (allowed: replicas,"),
        ("etcd: {lease_ttl: 5}\n", "etcd.lease_ttl: unknown key"),
        ("pools: {decode: {replicas: -1, min_replicas: 0}}\n", "pools.decode.replicas: Input should be greater than or equal to 0 (got -1)"),
        ("pools: {decode: {min_replicas: 5}}\n", "pools.decode: min_replicas (5) must be <= max_replicas (4)"),
        ("pools: {prefill: {replicas: 9}}\n", "pools.prefill: replicas (9) must be within [min_replicas, max_replicas] = [1, 4]"),
        ("pools: {prefill: {resources: {gpu_x: -1}}}\n", "pools.prefill.resources: resource 'gpu_x' must be >= 0"),
        ("etcd: {lease_ttl_s: 0}\n", "etcd.lease_ttl_s: Input should be greater than or equal to 1 (got 0)"),
        ("etcd: {endpoints: [nohost]}\n", "etcd.endpoints: etcd endpoint 'nohost' must look like host:port"),
        ("etcd: {user: u}\n", "etcd: user and password must be set together"),
        ("etcd: {client_cert: /c.pem}\n", "etcd: client_cert and client_key must be set together"),
        ("etcd: {endpoints: ['http://e:2379'], ca_cert: /ca.pem}\n", "http:// endpoint contradicts the TLS settings"),
        ("server: {port: 70000}\n", "server.port: Input should be less than or equal to 65535"),
        ("server: {port: 8001}\n", "server: port and admin_port must differ"),
        ("router: {stream_interval_tokens: 0}\n", "router.stream_interval_tokens: must be 'auto' or >= 1 tokens, got 0"),
        ("router: {policy: random}\n", "router.policy: Input should be 'kv_aware', 'cache_aware' or 'round_robin'"),
        ("router: {min_decode_workers: 5}\n", "router.min_decode_workers (5) exceeds pools.decode.max_replicas (4)"),
        ("transfer: {backend: rdma}\n", "transfer.backend: Input should be 'nixl' or 'tcp'"),
        ("engine: {block_size: 0}\n", "engine.block_size: Input should be greater than or equal to 1"),
        ("pools: {prefill: {engine: {block_size: 32}}}\n", "pools.prefill.engine cannot set ['block_size']"),
        ("pools: {decode: {engine: {max_num_seqs: 0}}}\n",
         "pools.decode.engine.max_num_seqs: Input should be greater than or equal to 1"),
        ("pools: {decode: {engine: {max_seqs: 8}}}\n", "pools.decode.engine.max_seqs: Extra inputs are not permitted"),
        ("cluster_name: a/b\n", "cluster_name: cluster_name 'a/b' must be 1-63 characters"),
        ("kv_quota: {budget_fraction: 0}\n", "kv_quota.budget_fraction: Input should be greater than 0"),
        ("kv_quota: {memory_low_percent: 95}\n", "kv_quota: memory_low_percent (95.0) must be <= memory_high_percent (90.0)"),
    ],
)
def test_errors_name_the_key(tmp_path, yaml_text, expected):
    path = write(tmp_path, yaml_text)
    message = error_of(path)
    assert expected in message, message
    assert str(path) in message


def test_every_error_is_reported_at_once(tmp_path):
    message = error_of(write(tmp_path, "etcd: {lease_ttl_s: 0}\nserver: {port: 0}\n"))
    assert "etcd.lease_ttl_s" in message and "server.port" in message


def test_secrets_never_appear_in_errors(tmp_path):
    message = error_of(write(tmp_path, "server: {admin_token: [leaky-secret]}\n"))
    assert "server.admin_token" in message and "leaky-secret" not in message


def test_bad_files(tmp_path):
    assert "cannot read config file" in error_of(tmp_path / "missing.yaml")
    assert "not valid YAML" in error_of(write(tmp_path, "pools: [unclosed\n"))
    assert "top level must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")) == PdserveConfig()  # an empty file is all defaults


def test_endpoint_forms():
    assert parse_endpoint("etcd-0:2379") == ("etcd-0", 2379)
    assert parse_endpoint("https://10.0.0.5:2379") == ("10.0.0.5", 2379)
    assert EtcdConfig(endpoints=["https://e:2379"]).use_tls
    with pytest.raises(ValueError):
        parse_endpoint("etcd-0:notaport")


def test_pool_engine_settings_override_the_engine_section(tmp_path):
    path = write(tmp_path, "engine: {max_num_seqs: 32, block_size: 8}\n"
                           "pools: {prefill: {engine: {max_num_batched_tokens: 8192, max_num_seqs: 4}}}\n")
    c = load_config(path, {"pools.decode.engine.num_kv_blocks": 2048})
    prefill, decode = c.engine_for("prefill"), c.engine_for("decode")
    assert (prefill.max_num_batched_tokens, prefill.max_num_seqs, prefill.block_size) == (8192, 4, 8)
    assert (decode.max_num_batched_tokens, decode.max_num_seqs, decode.num_kv_blocks) == (512, 32, 2048)
    assert c.engine.num_kv_blocks == 512 and c.engine.max_num_seqs == 32  # the section itself is unchanged


def test_parsers_from_the_command_line(tmp_path):
    """`pdserve up --tool-call-parser hermes` sets server.tool_call_parser (off by default),
    --reasoning-parser server.reasoning_parser; an unknown parser is a config error that names the key."""
    import argparse

    from cluster.cli import _overrides, _up_args

    p = argparse.ArgumentParser()
    _up_args(p)
    assert load_config(None, _overrides(p.parse_args(["--tool-call-parser", "hermes"]))).server.tool_call_parser == \
        "hermes"
    assert load_config(None, _overrides(p.parse_args([]))).server.tool_call_parser is None
    assert load_config(None, _overrides(p.parse_args(["--reasoning-parser", "qwen3"]))).server.reasoning_parser == \
        "qwen3"
    with pytest.raises(ConfigError, match="server.tool_call_parser"):
        load_config(None, {"server.tool_call_parser": "mistral"})
