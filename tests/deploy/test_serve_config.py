"""rayservice.yaml's serveConfigV2: Ray Serve's own deploy schema, no key Serve would ignore, the
config path it passes is where the ConfigMap is mounted, and its import path is the real builder."""

from __future__ import annotations

import inspect
import types

import pytest
import yaml
from pydantic import BaseModel
from ray._common.utils import import_attr
from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

from cluster.config import parse_config
from manifests import one, pod_templates

IMPORT_PATH = "router.app:build_app"


def serve_config() -> dict:
    return yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])


def test_serve_config_v2_matches_serves_deploy_schema():
    deploy = ServeDeploySchema.model_validate(serve_config())
    (app,) = deploy.applications
    assert isinstance(app, ServeApplicationSchema)
    assert app.import_path == IMPORT_PATH
    assert app.route_prefix == "/"


def test_serve_config_v2_has_no_key_serve_would_silently_ignore():
    """Serve's models accept unknown keys and drop them; a misspelt key would vanish unnoticed."""
    raw = serve_config()
    assert set(raw) <= set(ServeDeploySchema.model_fields)
    assert set(raw["http_options"]) <= set(HTTPOptionsSchema.model_fields)
    for app in raw["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields)


def test_deploy_schema_rejects_an_application_without_import_path():
    raw = serve_config()
    raw["applications"][0]["import_pth"] = raw["applications"][0].pop("import_path")
    with pytest.raises(ValueError, match="import_path"):
        ServeDeploySchema.model_validate(raw)


def test_app_args_point_at_the_mounted_configmap_and_ports_agree():
    raw = serve_config()
    (app,) = raw["applications"]
    config_map = one("ConfigMap", "pdserve-config")
    head = pod_templates(one("RayService")["spec"]["rayClusterConfig"])["head"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "pdserve-config")
    (key,) = config_map["data"]
    assert app["args"] == {"config_path": f"{mount['mountPath']}/{key}"}
    config = parse_config(yaml.safe_load(config_map["data"][key]))
    assert raw["http_options"] == {"host": "0.0.0.0", "port": config.server.port}


def test_import_path_resolves_to_the_app_builder():
    """What the Serve controller does with serveConfigV2: import_attr(import_path), then call it
    with `args` (validated first when its one parameter is a pydantic model)."""
    try:
        builder = import_attr(IMPORT_PATH)
    except (ImportError, AttributeError) as e:
        pytest.fail(
            f"serveConfigV2 in deploy/kuberay/rayservice.yaml imports {IMPORT_PATH!r}, which does not "
            f"resolve yet ({type(e).__name__}: {e}). router/app.py must define build_app(args) returning "
            "a Ray Serve Application (args: {'config_path': ...} or {'config': {...}})."
        )
    assert isinstance(builder, types.FunctionType), f"{IMPORT_PATH} is {type(builder)}, not a builder function"
    parameters = list(inspect.signature(builder).parameters.values())
    assert len(parameters) == 1, "Serve calls an application builder with exactly one argument"
    (app,) = serve_config()["applications"]
    annotation = parameters[0].annotation
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        annotation.model_validate(app["args"])
