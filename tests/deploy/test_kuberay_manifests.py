"""deploy/kuberay: the RayService / RayCluster manifests against KubeRay's CRD schemas, and the
wiring between them, the core objects and the pdserve config (names, ports, resources)."""

from __future__ import annotations

import copy
import json
import shlex

import kubernetes_validate
import pytest
import yaml

from cluster.config import parse_config
from kuberay_schema import CRDSchemas
from manifests import KUBERAY_KINDS, kuberay_documents, one, pod_templates, ray_cluster_specs

K8S_VERSION = "1.33.0"  # a version kubernetes-validate ships schemas for
ROLES = ("prefill", "decode")


@pytest.fixture(scope="module")
def crds() -> CRDSchemas:
    # Fails (never skips) with a message naming the folders it looked in and the env variable.
    return CRDSchemas.load()


def kuberay_manifests() -> list[tuple[str, dict]]:
    return [(f, d) for f, d in kuberay_documents() if d["kind"] in KUBERAY_KINDS]


def test_crds_cover_raycluster_rayservice_rayjob(crds):
    assert crds.kinds() == KUBERAY_KINDS
    assert {d["kind"] for _, d in kuberay_manifests()} == {"RayService", "RayCluster"}


@pytest.mark.parametrize("file_name,manifest", kuberay_manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_matches_its_crd_schema(crds, file_name, manifest):
    assert crds.errors(manifest) == []


def test_schema_check_rejects_unknown_fields_bad_quantities_and_cel_fields(crds):
    manifest = copy.deepcopy(one("RayService"))
    cluster = manifest["spec"]["rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["maxReplica"] = 3
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "16 GB"
    manifest["spec"]["managedBy"] = "ray.io/kuberay-operator"
    errors = "\n".join(crds.errors(manifest))
    assert "'maxReplica' was unexpected" in errors
    assert "limits.memory: '16 GB' does not match" in errors
    assert "spec.managedBy: this field carries CEL rules" in errors


@pytest.mark.parametrize("file_name,spec", list(ray_cluster_specs().items()))
def test_pod_templates_and_metadata_are_valid_kubernetes(file_name, spec):
    """The CRDs embed the pod schema; kubernetes-validate checks the same templates strictly."""
    for group, template in pod_templates(spec).items():
        wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{file_name}-{group}"}, "template": template}
        kubernetes_validate.validate(wrapper, K8S_VERSION, strict=True)
    manifest = next(d for f, d in kuberay_manifests() if f == file_name)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest["metadata"]}, K8S_VERSION, strict=True)


def role_resources(group: dict) -> dict[str, float]:
    """What `ray start` receives: KubeRay passes rayStartParams.resources through a shell."""
    (word,) = shlex.split(f"--resources={group['rayStartParams']['resources']}")
    return json.loads(word.removeprefix("--resources="))


def pdserve_config():
    return parse_config(yaml.safe_load(one("ConfigMap", "pdserve-config")["data"]["config.yaml"]))


@pytest.mark.parametrize("file_name,spec", list(ray_cluster_specs().items()))
def test_worker_groups_advertise_the_resources_the_pools_ask_for(file_name, spec):
    config = pdserve_config()
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(ROLES)
    assert "resources" not in spec["headGroupSpec"]["rayStartParams"]
    for role in ROLES:
        group, pool = groups[role], getattr(config.pools, role)
        advertised = role_resources(group)
        assert advertised == {f"pdserve_{role}": 1}
        assert set(pool.resources) == set(advertised)
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= pool.num_gpus > 0
        assert group["template"]["spec"]["nodeSelector"] == {"pdserve.io/pool": role}
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("file_name,spec", list(ray_cluster_specs().items()))
def test_every_ray_pod_mounts_the_config_and_the_head_gets_the_token(file_name, spec):
    config_map, secret = one("ConfigMap", "pdserve-config"), one("Secret", "pdserve-admin-token")
    for group, template in pod_templates(spec).items():
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/pdserve")
        assert volumes[mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"], group
    head = pod_templates(spec)["head"]["spec"]["containers"][0]
    (token,) = [e for e in head["env"] if e["name"] == "PDSERVE_ADMIN_TOKEN"]
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    (keys,) = [e for e in head["env"] if e["name"] == "PDSERVE_API_KEY"]  # optional: no Secret, /v1 open
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is True


@pytest.mark.parametrize("file_name,spec", list(ray_cluster_specs().items()))
def test_gpu_workers_keep_their_compile_caches_on_the_node(file_name, spec):
    """Triton's and inductor's caches point into a hostPath volume on every GPU worker pod: a worker
    restarted or rescheduled on the node finds its kernels compiled (a fresh 2x H200 host took
    108 s to bring a cluster up, most of it compiling)."""
    for group, template in pod_templates(spec).items():
        if group == "head":
            continue
        pod = template["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
            path = env.get(var)
            assert path, (file_name, group, var)
            (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
            assert not mount.get("readOnly"), (file_name, group, var)
            host = volumes[mount["name"]].get("hostPath")
            assert host and host["type"] == "DirectoryOrCreate", (file_name, group, var)
        assert env["TRITON_CACHE_DIR"] != env["TORCHINDUCTOR_CACHE_DIR"]
        # hostPath creates the directory root-owned: an init container (the same image, as root)
        # hands it to the user Ray runs as, or Triton could not write its cache and the worker fails
        (init,) = pod["initContainers"]
        assert init["image"] == container["image"] and init["securityContext"]["runAsUser"] == 0
        (init_mount,) = init["volumeMounts"]
        assert volumes[init_mount["name"]].get("hostPath") == host
        script = init["command"][-1]
        assert "chown -R 1000:100 " + init_mount["mountPath"] in script, script
        for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
            assert env[var] in script  # made before Triton looks for it


def test_services_reach_the_head_on_the_configured_ports():
    config = pdserve_config()
    for file_name, spec in ray_cluster_specs().items():
        head = pod_templates(spec)["head"]
        ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == config.server.port and ports["admin"] == config.server.admin_port, file_name
        for service_name, port_name in (("pdserve-openai", "serve"), ("pdserve-admin", "admin")):
            service = one("Service", service_name)["spec"]
            assert service["selector"].items() <= head["metadata"]["labels"].items(), (file_name, service_name)
            assert [p["targetPort"] for p in service["ports"]] == [port_name]
            # The selector must not also match a worker pod.
            for group, template in pod_templates(spec).items():
                if group != "head":
                    assert not service["selector"].items() <= template["metadata"]["labels"].items()


def test_config_names_the_etcd_client_service():
    config = pdserve_config()
    service = one("Service", "pdserve-etcd")
    statefulset = one("StatefulSet", "pdserve-etcd")
    assert config.etcd.endpoints == [f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    peers = one("Service", statefulset["spec"]["serviceName"])["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True


def test_raycluster_head_runs_pdserve_up_against_its_own_ray():
    manifest = one("RayCluster")
    assert manifest["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    spec = manifest["spec"]
    head = pod_templates(spec)["head"]["spec"]["containers"][0]
    script = head["args"][0]
    assert '"$KUBERAY_GEN_RAY_START_CMD" &' in script
    assert "pdserve up --ray-address auto --config /etc/pdserve/config.yaml --host 0.0.0.0 --detach" in script
    # With the annotation KubeRay runs workers' commands as written too: they must start Ray.
    for group in spec["workerGroupSpecs"]:
        assert '"$KUBERAY_GEN_RAY_START_CMD"' in group["template"]["spec"]["containers"][0]["args"][0]


def test_raycluster_and_rayservice_describe_the_same_ray_cluster():
    """The two variants differ only in how pdserve is started (container commands, annotation)."""
    service_spec, cluster_spec = (copy.deepcopy(s) for s in (one("RayService")["spec"]["rayClusterConfig"], one("RayCluster")["spec"]))
    for spec in (service_spec, cluster_spec):
        for template in pod_templates(spec).values():
            for container in template["spec"]["containers"]:
                container.pop("command", None)
                container.pop("args", None)
    assert service_spec == cluster_spec


def test_crd_folder_comes_from_the_env_variable(tmp_path, monkeypatch):
    import kuberay_schema

    source = kuberay_schema.find_crd_dir()
    for name in kuberay_schema.CRD_FILES.values():
        (tmp_path / name).symlink_to(source / name)
    monkeypatch.setenv(kuberay_schema.CRD_ENV, str(tmp_path))
    assert kuberay_schema.find_crd_dir() == tmp_path


def test_missing_crds_fail_with_where_to_put_them(tmp_path, monkeypatch):
    import kuberay_schema

    monkeypatch.setattr(kuberay_schema, "crd_search_paths", lambda: [tmp_path])
    with pytest.raises(kuberay_schema.CRDsNotFoundError) as raised:
        kuberay_schema.CRDSchemas.load()
    message = str(raised.value)
    assert str(tmp_path) in message and kuberay_schema.CRD_ENV in message
    assert all(name in message for name in kuberay_schema.CRD_FILES.values())
