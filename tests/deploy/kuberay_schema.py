"""KubeRay CRD schemas as strict JSON-schema validators: an offline stand-in for the API server.

The CRDs (RayCluster, RayService, RayJob) come from the KubeRay project; they are found through
env PDSERVE_KUBERAY_CRDS, /work/shared/kuberay-crds/ or ../shared/kuberay-crds/ beside the repo.

How the OpenAPI v3 schemas are read (what `kubectl apply` with strict field validation does):
- an object schema with `properties` and no `additionalProperties` rejects unknown fields, unless
  it carries `x-kubernetes-preserve-unknown-fields: true`;
- `x-kubernetes-int-or-string` accepts an integer or a string (the CRDs also spell it as anyOf);
- `nullable: true` also accepts null;
- `x-kubernetes-validations` (CEL rules) are not evaluated here: a manifest that sets such a field
  is reported as unverifiable rather than passed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from manifests import REPO

CRD_ENV = "PDSERVE_KUBERAY_CRDS"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
}


# libyaml when present: the three CRDs are 3 MB of YAML.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class CRDsNotFoundError(RuntimeError):
    pass


def crd_search_paths() -> list[Path]:
    paths = []
    if os.environ.get(CRD_ENV):
        paths.append(Path(os.environ[CRD_ENV]))
    paths += [Path("/work/shared/kuberay-crds"), (REPO / ".." / "shared" / "kuberay-crds").resolve()]
    return paths


def find_crd_dir() -> Path:
    for path in crd_search_paths():
        if all((path / name).is_file() for name in CRD_FILES.values()):
            return path
    looked = ", ".join(str(p) for p in crd_search_paths())
    raise CRDsNotFoundError(
        f"KubeRay CRDs not found (looked in: {looked}). Put {', '.join(CRD_FILES.values())} from "
        "ray-project/kuberay ray-operator/config/crd/bases/ into one of those folders, or set "
        f"{CRD_ENV}=<folder holding them>."
    )


def strict_schema(node: Any) -> Any:
    """A copy of an OpenAPI v3 schema with the reading rules of the module docstring applied."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_schema(value) for key, value in node.items() if key != "properties"}
    if "properties" in node:
        out["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"] if isinstance(node["type"], str) else [*node["type"], "null"]
    open_ended = node.get("x-kubernetes-preserve-unknown-fields") is True
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node and not open_ended:
        out["additionalProperties"] = False
    return out


def _cel_rules_unverifiable(validator, rules, instance, schema):
    messages = "; ".join(rule.get("message", rule.get("rule", "?")) for rule in rules)
    yield jsonschema.ValidationError(
        f"this field carries CEL rules ({messages}) that the offline check cannot evaluate; "
        "leave it unset or check it against a real API server"
    )


_Validator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-validations": _cel_rules_unverifiable}
)


class CRDSchemas:
    """Validators by (apiVersion, kind) for every served version of the three KubeRay CRDs."""

    def __init__(self, crd_dir: Path) -> None:
        self.crd_dir = crd_dir
        self._validators: dict[tuple[str, str], jsonschema.Validator] = {}
        for kind, file_name in CRD_FILES.items():
            crd = yaml.load((crd_dir / file_name).read_text(), Loader=_Loader)
            if crd["spec"]["names"]["kind"] != kind:
                raise CRDsNotFoundError(f"{crd_dir / file_name} defines {crd['spec']['names']['kind']}, not {kind}")
            group = crd["spec"]["group"]
            for version in crd["spec"]["versions"]:
                if not version.get("served", False):
                    continue
                schema = strict_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                self._validators[(f"{group}/{version['name']}", kind)] = _Validator(schema)

    @classmethod
    def load(cls) -> "CRDSchemas":
        return cls(find_crd_dir())

    def kinds(self) -> set[str]:
        return {kind for _, kind in self._validators}

    def errors(self, manifest: dict) -> list[str]:
        """Every schema violation of a manifest, as 'path: message' lines; [] when valid."""
        key = (manifest.get("apiVersion", ""), manifest.get("kind", ""))
        validator = self._validators.get(key)
        if validator is None:
            known = ", ".join(f"{a} {k}" for a, k in sorted(self._validators))
            return [f"no CRD schema for apiVersion {key[0]!r} kind {key[1]!r} (known: {known})"]
        return [
            f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
        ]
