"""deploy/kuberay: the core Kubernetes objects (StatefulSet, Services, Secret, ConfigMap) against
Kubernetes' own OpenAPI schemas, offline, through kubernetes-validate (strict: unknown fields fail)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from manifests import CORE_KINDS, KUBERAY_KINDS, kuberay_documents, one

K8S_VERSION = "1.33.0"  # a version kubernetes-validate ships schemas for


def core_documents() -> list[tuple[str, dict]]:
    return [(f, d) for f, d in kuberay_documents() if d["kind"] not in KUBERAY_KINDS]


def test_every_document_is_a_known_kind():
    kinds = {d["kind"] for _, d in core_documents()}
    assert kinds == CORE_KINDS


@pytest.mark.parametrize(
    "file_name,manifest", core_documents(), ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in core_documents()]
)
def test_core_manifest_is_valid_kubernetes(file_name, manifest):
    assert kubernetes_validate.validate(manifest, K8S_VERSION, strict=True) == K8S_VERSION.rsplit(".", 1)[0]


def test_strict_validation_rejects_a_misplaced_field():
    statefulset = copy.deepcopy(one("StatefulSet", "pdserve-etcd"))
    statefulset["spec"]["template"]["spec"]["containers"][0]["port"] = 2379
    with pytest.raises(kubernetes_validate.ValidationError, match="'port' was unexpected"):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)


def test_etcd_members_advertise_names_the_headless_service_resolves():
    statefulset = one("StatefulSet", "pdserve-etcd")
    spec = statefulset["spec"]
    args = spec["template"]["spec"]["containers"][0]["args"]
    flags = dict(a.removeprefix("--").split("=", 1) for a in args)
    peer_domain = spec["serviceName"]
    name = statefulset["metadata"]["name"]
    members = [m.split("=", 1) for m in flags["initial-cluster"].split(",")]
    assert len(members) == spec["replicas"]
    for i, (member, url) in enumerate(members):
        assert member == f"{name}-{i}"
        assert url == f"http://{name}-{i}.{peer_domain}:2380"
    assert flags["name"] == "$(POD_NAME)"
    assert flags["advertise-client-urls"] == f"http://$(POD_NAME).{peer_domain}:2379"
