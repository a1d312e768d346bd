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
    # Whole-request READs between VRAM caches of one node (nixl backend; see kv_transfer/cuda_ipc.py):
    # auto: CUDA IPC (the peer's segments mapped here, device copies) when the peer is on this
    #       node and its GPU is visible here, else NIXL; a peer whose handles cannot be opened is
    #       read with NIXL, with a warning. Each peer's choice is logged once.
    # on:   as auto, but a same-node VRAM peer that CUDA IPC cannot open is an error, never NIXL.
    # off:  NIXL for every peer.
    cuda_ipc: Literal["auto", "on", "off"] = "auto"
    # NIXL's progress thread sleeps this long between rounds. nixl's Python agent would start it
    # with no delay: a busy loop that keeps one core at 100 % in every idle worker. One-sided
    # transports (shared memory, CMA, RDMA, CUDA IPC) need no progress on the side being read;
    # over TCP a round of the peer's protocol waits up to this long for it.
    nixl_progress_delay_us: int = Field(100, ge=0, le=100_000)

    @model_validator(mode="after")
    def _layerwise_needs_nixl(self) -> "TransferConfig":
        if self.layerwise and self.backend != "nixl":
            raise ValueError("transfer.layerwise needs transfer.backend: nixl (the tcp backend only does whole-request reads)")
        return self
