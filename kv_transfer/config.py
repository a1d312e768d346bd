"""Config section the transceiver owns: which transport moves KV blocks, and its time limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["nixl", "tcp"] = Field("nixl", description="tcp only when chosen explicitly; never a fallback")
    lease_ttl_s: float = Field(30, gt=0, description="How long prefill keeps a handle's blocks pinned for decode")
    deadline_s: float = Field(10, gt=0, description="Max wait for one transfer")
    layerwise: bool = False
