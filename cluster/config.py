"""The pdserve config tree (`PdserveConfig`), validated once at load.

Each component owns the model of its own section (engine, router, transfer live in their folders);
this module assembles them, owns the cluster-level sections, and loads YAML plus dotted overrides.
Unknown keys are errors; every error message names the dotted key that is wrong.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from cluster.autoscale_policy import AutoscalingConfig
from cluster.quota_policy import KVQuotaConfig
from kv_transfer.config import TransferConfig
from router.config import LimitsConfig, RouterConfig
from workers.engine.config import EngineConfig, ModelConfig

ADMIN_TOKEN_ENV = "PDSERVE_ADMIN_TOKEN"
API_KEYS_ENV = "PDSERVE_API_KEY"  # comma-separated: several keys, e.g. while rotating one

# Cluster names become etcd path segments and Ray namespaces: no '/', so /pdserve/a/ and
# /pdserve/ab/ can never overlap.
_CLUSTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(ValueError):
    """A config file or override that does not validate; the message names every bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# engine settings every worker of a cluster must share: the KV block layout a READ assumes on both
# sides (block_size), the router's context limit, the KV resizer's segment size
SHARED_ENGINE_KEYS = frozenset({"block_size", "max_model_len", "blocks_per_segment"})


class PoolConfig(_Section):
    replicas: int = Field(1, ge=0, description="Workers started at launch")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=0)
    num_cpus: float = Field(0.25, ge=0, description="Ray CPUs per worker (fractional on CPU hosts)")
    num_gpus: float = Field(0, ge=0, description="Ray GPUs per worker")
    resources: dict[str, float] = Field(
        default_factory=dict, description='Ray custom resources per worker, e.g. {"pdserve_prefill": 0.01}'
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="Engine settings of this pool's workers over the cluster's engine section, e.g. "
                    "{max_num_batched_tokens: 8192} for prefill workers (each phase tuned on its own); "
                    f"not {', '.join(sorted(SHARED_ENGINE_KEYS))}, which every worker must share",
    )

    @field_validator("resources")
    @classmethod
    def _non_negative(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if amount < 0:
                raise ValueError(f"resource {name!r} must be >= 0, got {amount}")
        return resources

    @model_validator(mode="after")
    def _bounds(self) -> "PoolConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) must be within [min_replicas, max_replicas] = "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        return self


class PoolsConfig(_Section):
    prefill: PoolConfig = Field(default_factory=PoolConfig)
    decode: PoolConfig = Field(default_factory=PoolConfig)


class EtcdConfig(_Section):
    """How to reach etcd. TLS is on when ca_cert or a client cert is set, or an endpoint is https://."""

    endpoints: list[str] = Field(
        default_factory=list, description='["host:2379", ...]; empty: `pdserve up` starts a local etcd'
    )
    lease_ttl_s: int = Field(10, ge=1, description="Worker registration lease; refreshed every TTL/3")
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    user: str | None = None
    password: SecretStr | None = None

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, endpoints: list[str]) -> list[str]:
        for endpoint in endpoints:
            parse_endpoint(endpoint)
        return endpoints

    @model_validator(mode="after")
    def _pairs(self) -> "EtcdConfig":
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be set together")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password must be set together")
        schemes = {urlsplit(e).scheme for e in self.endpoints if "://" in e}
        if "http" in schemes and self.use_tls:
            raise ValueError("an http:// endpoint contradicts the TLS settings (use https:// or host:port)")
        return self

    @property
    def use_tls(self) -> bool:
        return (
            self.ca_cert is not None
            or self.client_cert is not None
            or any(e.startswith("https://") for e in self.endpoints)
        )


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port', 'http://host:port' or 'https://host:port' -> (host, port)."""
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    if parts.scheme not in ("", "http", "https") or parts.path not in ("", "/"):
        raise ValueError(f"etcd endpoint {endpoint!r} must look like host:port or https://host:port")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(f"etcd endpoint {endpoint!r} must look like host:port or https://host:port")
    return parts.hostname, port


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535, description="OpenAI-compatible endpoint")
    admin_port: int = Field(8001, ge=1, le=65535, description="Management API")
    admin_token: SecretStr | None = Field(
        None, description=f"Management API token; or env {ADMIN_TOKEN_ENV}; `pdserve up` generates one if neither"
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description=f"Keys the OpenAI endpoint accepts as 'Authorization: Bearer <key>' (the openai client's "
                    f"api_key); or env {API_KEYS_ENV} (comma-separated); none: the endpoint is open. /health, /ready, "
                    "/metrics and the OpenAPI pages stay open for probes and scrapers")
    drain_timeout_s: float = Field(60, gt=0, description="How long a drained worker may finish in-flight requests")
    worker_start_timeout_s: float = Field(900, gt=0, description="Loading a worker's model may take this long")
    replace_dead_workers: bool = Field(True, description="Start a new worker in place of one whose Ray actor died "
                                                         "(cluster/pool_keeper.py)")
    health_check_interval_s: float = Field(2.0, gt=0, description="How often the manager pings its workers")
    ingress_replicas: int = Field(
        1, ge=1, description="Ray Serve replicas of the OpenAI endpoint: HTTP parsing, tokenizing, SSE and routing "
                             "spread over them; each admits limits.max_concurrent_requests and routes from its own "
                             "view of the workers (polled, so all views see the same loads and prefixes)")
    ingress_num_cpus: float = Field(0.1, ge=0, description="Ray CPUs per endpoint replica")
    tool_call_parser: Literal["hermes", "gpt_oss"] | None = Field(
        None, description="How this model writes tool calls in its text, for chat tool_choice 'auto' (OpenAI's "
                          "default with tools): hermes (<tool_call>{...}</tool_call>: Hermes, Qwen 2.5/3), gpt_oss "
                          "(harmony's messages to functions.NAME; the same as reasoning_parser gpt_oss). None: "
                          "'auto' is a 400; a named function and 'required' work with any model")
    reasoning_parser: Literal["qwen3", "deepseek_r1", "gpt_oss"] | None = Field(
        None, description="Keep a thinking model's reasoning apart from its answer: chat's "
                          "message.reasoning_content, the Responses API's reasoning item. qwen3, deepseek_r1: "
                          "<think>...</think>; gpt_oss: harmony's channels (analysis, final, and tool calls "
                          "to functions.NAME; the same as tool_call_parser gpt_oss)")

    @field_validator("api_keys")
    @classmethod
    def _keys_not_empty(cls, v: list[SecretStr]) -> list[SecretStr]:
        if any(not k.get_secret_value().strip() for k in v):
            raise ValueError("an API key must not be empty")
        return v

    @model_validator(mode="after")
    def _distinct_ports(self) -> "ServerConfig":
        if self.port == self.admin_port:
            raise ValueError(f"port and admin_port must differ (both {self.port})")
        return self

    @model_validator(mode="after")
    def _one_output_format(self) -> "ServerConfig":
        parsers = {self.tool_call_parser, self.reasoning_parser} - {None}
        if "gpt_oss" in parsers and len(parsers) > 1:
            raise ValueError(f"gpt_oss (harmony) parses both the reasoning and the tool calls: it cannot go with "
                             f"{(parsers - {'gpt_oss'}).pop()}; set server.tool_call_parser and "
                             f"server.reasoning_parser to gpt_oss or leave one unset")
        return self

    @property
    def harmony(self) -> bool:
        """The output is gpt-oss's harmony messages (router/harmony.py)."""
        return "gpt_oss" in (self.tool_call_parser, self.reasoning_parser)


class PdserveConfig(_Section):
    cluster_name: str = Field("default", description="etcd keys /pdserve/<cluster_name>/... and Ray namespace")
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    pools: PoolsConfig = Field(default_factory=PoolsConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    etcd: EtcdConfig = Field(default_factory=EtcdConfig)
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    kv_quota: KVQuotaConfig = Field(default_factory=KVQuotaConfig)

    @field_validator("cluster_name")
    @classmethod
    def _cluster_name(cls, name: str) -> str:
        validate_cluster_name(name)
        return name

    @model_validator(mode="after")
    def _pool_engines(self) -> "PdserveConfig":
        for role in ("prefill", "decode"):
            overrides = getattr(self.pools, role).engine
            shared = sorted(SHARED_ENGINE_KEYS & set(overrides))
            if shared:
                raise ValueError(f"pools.{role}.engine cannot set {shared}: every worker shares them (set engine.*)")
            try:
                self.engine_for(role)
            except ValidationError as e:
                bad = "; ".join(f"pools.{role}.engine.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                raise ValueError(bad) from None
        return self

    def engine_for(self, role: str) -> EngineConfig:
        """The engine settings of a ``role`` ("prefill" | "decode") worker: engine.* under its pool's."""
        overrides = getattr(self.pools, role).engine
        if not overrides:
            return self.engine
        return EngineConfig(**{**self.engine.model_dump(exclude_unset=True), **overrides})

    @model_validator(mode="after")
    def _pools_fit_readiness(self) -> "PdserveConfig":
        # A readiness gate above the pool's ceiling could never open.
        for role, needed in (("prefill", self.router.min_prefill_workers), ("decode", self.router.min_decode_workers)):
            ceiling = getattr(self.pools, role).max_replicas
            if needed > ceiling:
                raise ValueError(
                    f"router.min_{role}_workers ({needed}) exceeds pools.{role}.max_replicas ({ceiling}): "
                    "the cluster could never become ready"
                )
        return self


def validate_cluster_name(name: str) -> None:
    if not _CLUSTER_NAME_RE.match(name):
        raise ValueError(
            f"cluster_name {name!r} must be 1-63 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> PdserveConfig:
    """YAML file (None: all defaults) + dotted overrides ({"pools.prefill.replicas": 2}).

    server.admin_token comes from env PDSERVE_ADMIN_TOKEN, and server.api_keys from env
    PDSERVE_API_KEY (comma-separated), when neither the file nor the overrides set them. Raises
    ConfigError naming the source and every bad key.
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {source}: {e}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded or {}
    for dotted_key, value in (overrides or {}).items():
        _set_dotted(raw, dotted_key, value)
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if token and _get_dotted(raw, "server.admin_token") is None:
        _set_dotted(raw, "server.admin_token", token)
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if keys and not _get_dotted(raw, "server.api_keys"):  # unset or [] (the shipped configs' placeholder)
        _set_dotted(raw, "server.api_keys", keys)
    return parse_config(raw, source=source)


def parse_config(raw: dict[str, Any], source: str = "<config>") -> PdserveConfig:
    try:
        return PdserveConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config ({source}):\n" + format_validation_error(e)) from None


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors(include_url=False):
        key = ".".join(str(p) for p in item["loc"]) or "<top level>"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_allowed_keys_hint(item['loc'])}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            shows_input = item["type"] != "missing" and not isinstance(item.get("input"), (dict, BaseModel))
            if shows_input and not _is_secret_key(key):
                message += f" (got {item['input']!r})"
            lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def _is_secret_key(key: str) -> bool:
    return key.endswith(("token", "password"))


def _allowed_keys_hint(loc: tuple) -> str:
    model: type[BaseModel] = PdserveConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    return f" (allowed: {', '.join(model.model_fields)})"


def _set_dotted(raw: dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    if not all(parts):
        raise ConfigError(f"override key {dotted_key!r} is not a dotted key like 'pools.prefill.replicas'")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise ConfigError(f"override {dotted_key!r}: {prefix} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _get_dotted(raw: dict[str, Any], dotted_key: str) -> Any:
    node: Any = raw
    for part in dotted_key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def config_to_yaml(config: PdserveConfig, *, reveal_secrets: bool = False) -> str:
    """YAML that load_config reads back to an equal config. Secrets print as '**********' unless
    reveal_secrets (for writing a config file a detached cluster reads back)."""
    data = _reveal(config.model_dump(mode="python"), reveal_secrets)
    return yaml.safe_dump(data, sort_keys=False)


def _reveal(node: Any, reveal: bool) -> Any:
    if isinstance(node, dict):
        return {k: _reveal(v, reveal) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_reveal(v, reveal) for v in node]
    if isinstance(node, SecretStr):
        return node.get_secret_value() if reveal else str(node)
    if isinstance(node, Path):
        return str(node)
    return node

