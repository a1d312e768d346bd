"""The `transfer:` section of the pdserve config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # nixl: one-sided NIXL/UCX READs straight between KV tensors (the default).
    # tcp: a socket stream served by the prefill side; only when chosen here, never a fallback.
    backend: Literal["nixl", "tcp"] = "nixl"
    lease_ttl_s: float = Field(30.0, gt=0, description="how long prefill keeps blocks pinned for decode")
    deadline_s: float = Field(10.0, gt=0, description="how long decode waits for one request's KV")
    layerwise: bool = Field(False, description="prefill WRITEs each layer as soon as it is computed")
    # UCX worker threads inside the NIXL backend (0 = NIXL's default); see benchmarks/README.md.
    nixl_num_threads: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _layerwise_needs_nixl(self) -> "TransferConfig":
        if self.layerwise and self.backend != "nixl":
            raise ValueError("transfer.layerwise needs transfer.backend: nixl (the tcp backend only does whole-request reads)")
        return self
