"""The pdserve configs shipped for clusters load with cluster.config.load_config, as `pdserve up`
and the Serve app builder load them, and place each pool on its own role's resource."""

from __future__ import annotations

import pytest
import yaml

from cluster.config import ConfigError, load_config
from manifests import PDSERVE_CLUSTER_CONFIG, one

ROLES = ("prefill", "decode")


def configmap_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(one("ConfigMap", "pdserve-config")["data"]["config.yaml"])
    return path


@pytest.fixture(params=["ray/pdserve-cluster.yaml", "kuberay/configmap.yaml"])
def config_path(request, tmp_path):
    return PDSERVE_CLUSTER_CONFIG if request.param.startswith("ray/") else configmap_config_file(tmp_path)


def test_config_loads_and_pins_each_pool_to_its_role(config_path, monkeypatch):
    monkeypatch.delenv("PDSERVE_ADMIN_TOKEN", raising=False)
    config = load_config(config_path)
    for role in ROLES:
        pool = getattr(config.pools, role)
        assert pool.resources == {f"pdserve_{role}": 0.01}
        assert pool.num_gpus == 1
    assert config.server.host == "0.0.0.0"
    assert len(config.etcd.endpoints) == 1, "a cluster config names its etcd; an empty list would start a private one"
    assert config.transfer.backend == "nixl"
    # The token is a secret: it comes from env PDSERVE_ADMIN_TOKEN (the Secret), never the file.
    assert config.server.admin_token is None


def test_admin_token_comes_from_the_environment(config_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_ADMIN_TOKEN", "t0ken-from-secret")
    assert load_config(config_path).server.admin_token.get_secret_value() == "t0ken-from-secret"
    monkeypatch.setenv("PDSERVE_API_KEY", "sk-a,sk-b")  # the endpoint's keys: the same way
    assert [k.get_secret_value() for k in load_config(config_path).server.api_keys] == ["sk-a", "sk-b"]


def test_loader_rejects_a_misspelt_key_in_the_shipped_config(config_path, tmp_path):
    raw = yaml.safe_load(config_path.read_text())
    raw["pools"]["prefill"]["resource"] = raw["pools"]["prefill"].pop("resources")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"pools\.prefill\.resource: unknown key"):
        load_config(bad)
