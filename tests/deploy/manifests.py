"""The deployment artifacts under deploy/, loaded for the tests: paths, YAML documents, lookups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RAY_UP_CONFIGS = [DEPLOY / "ray" / "aws.yaml", DEPLOY / "ray" / "local.yaml"]
PDSERVE_CLUSTER_CONFIG = DEPLOY / "ray" / "pdserve-cluster.yaml"
KUBERAY_DIR = DEPLOY / "kuberay"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"

KUBERAY_KINDS = {"RayCluster", "RayService", "RayJob"}
CORE_KINDS = {"StatefulSet", "Service", "Secret", "ConfigMap"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kuberay_documents() -> list[tuple[str, dict]]:
    """(file name, document) for every non-empty document of every YAML file in deploy/kuberay."""
    docs = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def one(kind: str, name: str | None = None) -> dict:
    """The single KubeRay-folder document of `kind` (and `name`); errors name what was found."""
    found = [d for _, d in kuberay_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(found) != 1:
        raise LookupError(f"expected one {kind} {name or ''} in {KUBERAY_DIR}, found {len(found)}")
    return found[0]


def ray_cluster_specs() -> dict[str, dict]:
    """The RayClusterSpec of each KubeRay manifest that has one, by file name."""
    specs = {}
    for file_name, doc in kuberay_documents():
        if doc["kind"] == "RayCluster":
            specs[file_name] = doc["spec"]
        elif doc["kind"] == "RayService":
            specs[file_name] = doc["spec"]["rayClusterConfig"]
    return specs


def pod_templates(cluster_spec: dict) -> dict[str, dict]:
    """Pod templates of a RayClusterSpec: 'head' and each worker group's name."""
    templates = {"head": cluster_spec["headGroupSpec"]["template"]}
    for group in cluster_spec["workerGroupSpecs"]:
        templates[group["groupName"]] = group["template"]
    return templates
