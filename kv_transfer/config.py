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
    # None (auto): 2000 when the KV cache is on a GPU, 100 otherwise. On an H100 the thread's UCX
    # CUDA transports poll the driver beside the engine's kernel launches: a 2048-token prefill
    # step inside a prefill worker took 27.6 ms at 100 us and 21.6 ms at 2000 us (TTFT p50 46.6 ->
    # 40.8 ms; benchmarks/README.md "Latency floor"). Same-node GPU READs go through CUDA IPC and
    # waits poll NIXL themselves, so the longer sleep delays neither.
    nixl_progress_delay_us: int | None = Field(None, ge=0, le=100_000)

    def progress_delay_us(self, device_type: str) -> int:
        if self.nixl_progress_delay_us is not None:
            return self.nixl_progress_delay_us
        return 2000 if device_type == "cuda" else 100

    @model_validator(mode="after")
    def _layerwise_needs_nixl(self) -> "TransferConfig":
        if self.layerwise and self.backend != "nixl":
            raise ValueError("transfer.layerwise needs transfer.backend: nixl (the tcp backend only does whole-request reads)")
        return self
