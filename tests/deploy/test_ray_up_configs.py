"""deploy/ray: the `ray up` cluster YAMLs pass Ray's own validation and agree with the pdserve config."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import jsonschema
import pytest
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.config import load_config
from manifests import PDSERVE_CLUSTER_CONFIG, RAY_UP_CONFIGS, load_yaml

ROLES = ("prefill", "decode")


def ray_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: merge the provider's defaults, then validate
    against ray/autoscaler/ray-schema.json and Ray's own cross-field checks."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_passes_rays_validator(path):
    prepared = ray_validate(load_yaml(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_rays_validator_rejects_a_misspelt_key(path):
    config = load_yaml(path)
    config["setup_command"] = config.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        ray_validate(config)


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_setup_installs_pinned_torch_before_pdserve(path):
    commands = load_yaml(path)["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if re.search(r"pip install .*torch==\d", c))
    pdserve_at = next(i for i, c in enumerate(commands) if re.search(r"pip install .*~/pdserve\b", c))
    assert torch_at < pdserve_at
    makefile_pin = re.search(r"torch==([\d.]+)", (path.parents[2] / "Makefile").read_text()).group(1)
    assert f"torch=={makefile_pin}" in commands[torch_at]


def test_aws_worker_types_advertise_the_resources_the_pools_ask_for():
    prepared = ray_validate(load_yaml(RAY_UP_CONFIGS[0]))
    pools = load_config(PDSERVE_CLUSTER_CONFIG).pools
    node_types = prepared["available_node_types"]
    head = node_types[prepared["head_node_type"]]
    for role in ROLES:
        pool = getattr(pools, role)
        (resource,) = pool.resources
        assert resource == f"pdserve_{role}"
        hosts = [name for name, t in node_types.items() if t["resources"].get(resource, 0) > 0]
        assert len(hosts) == 1, f"exactly one node type should advertise {resource}, got {hosts}"
        node_type = node_types[hosts[0]]
        assert node_type["resources"].get("GPU", 0) >= pool.num_gpus > 0
        assert node_type["min_workers"] >= 1
        assert resource not in head["resources"]


def test_local_role_table_covers_exactly_the_worker_ips():
    config = load_yaml(RAY_UP_CONFIGS[1])
    provider = config["provider"]
    start = " ".join(config["worker_start_ray_commands"])
    arms = re.findall(r'\*" ([\d.]+) "\*\) ROLE=(\w+)', start)
    roles_by_ip: dict[str, list[str]] = {}
    for ip, role in arms:
        roles_by_ip.setdefault(ip, []).append(role)
    assert sorted(roles_by_ip) == sorted(provider["worker_ips"])
    assert all(len(r) == 1 for r in roles_by_ip.values()), roles_by_ip
    assert {r[0] for r in roles_by_ip.values()} == set(ROLES)
    assert '--resources="{\\"pdserve_$ROLE\\": 1}"' in start
    head_commands = " ".join(config["head_start_ray_commands"])
    assert set(re.findall(r"\d+\.\d+\.\d+\.\d+(?=[:/ ]|$)", head_commands)) - {"127.0.0.1"} == {provider["head_ip"]}


def test_local_worker_resources_flag_parses_as_json_in_a_shell(tmp_path):
    """Ray receives --resources='{"pdserve_prefill": 1}' after the shell has removed the quoting."""
    start = load_yaml(RAY_UP_CONFIGS[1])["worker_start_ray_commands"][-1]
    flag = start[start.index("--resources="):].strip()  # the command's last argument
    echoed = subprocess.run(
        ["bash", "-c", f"ROLE=prefill; printf '%s' {flag}"], capture_output=True, text=True, check=True
    ).stdout
    assert echoed == '--resources={"pdserve_prefill": 1}'


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_head_renders_the_pdserve_config_with_its_etcd_endpoint(path, tmp_path):
    """Runs the head's render command for real (HOME = a temp dir holding the checkout's config)."""
    config = load_yaml(path)
    (render,) = [c for c in config["head_start_ray_commands"] if "pdserve-config.yaml" in c]
    if "hostname -I" in render:
        # aws.yaml asks the host for its address; give it a fixed one through a PATH shim.
        shim = tmp_path / "bin" / "hostname"
        shim.parent.mkdir()
        shim.write_text("#!/bin/sh\necho '10.0.3.7 '\n")
        shim.chmod(0o755)
        head_ip, path_env = "10.0.3.7", f"{shim.parent}:/usr/bin:/bin"
    else:
        head_ip, path_env = config["provider"]["head_ip"], "/usr/bin:/bin"
    home = tmp_path / "home"
    (home / "pdserve" / "deploy" / "ray").mkdir(parents=True)
    shutil.copy(PDSERVE_CLUSTER_CONFIG, home / "pdserve" / "deploy" / "ray" / PDSERVE_CLUSTER_CONFIG.name)
    subprocess.run(["bash", "-c", render], env={"HOME": str(home), "PATH": path_env}, check=True)
    rendered = load_config(home / "pdserve-config.yaml")
    original = load_config(PDSERVE_CLUSTER_CONFIG)
    assert rendered.etcd.endpoints == [f"{head_ip}:2379"]
    assert rendered.model_copy(update={"etcd": original.etcd}) == original
