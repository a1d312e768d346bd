"""Config sections the engine owns: which model to load, and how the engine runs it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="Local Hugging Face checkpoint dir; None = the default model")
    served_model_name: str | None = Field(None, description="Model id in /v1/models; default: directory name")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block")
    num_kv_blocks: int = Field(512, ge=1, description="Initial KV quota in blocks (rounded up to segments)")
    blocks_per_segment: int = Field(64, ge=1, description="KV memory is added and returned in segments of this many blocks")
    max_num_batched_tokens: int = Field(512, ge=1, description="Token budget per step (chunked prefill)")
    max_num_seqs: int = Field(64, ge=1, description="Max requests running at once")
    max_model_len: int | None = Field(None, ge=2, description="Context limit; default: the model's max_position_embeddings")
    enable_prefix_caching: bool = True
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    cuda_graphs: bool | Literal["auto"] = Field(
        "auto", description="Capture decode steps as CUDA graphs (CUDA only). 'auto' = capture them, and where "
                            "the model's forward cannot be captured (transformers' mixture-of-experts layers "
                            "copy from the host inside it) decode without them, the reason logged; true: that "
                            "is an error")
    compile_decode: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the decode step before capturing its CUDA graphs: fuses norms, RoPE and "
                            "activations (CUDA only). 'auto' = on")
    compile_prefill: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the steps that are not decode-graph replays (prefill chunks, "
                            "mixed steps) with a symbolic token count: fuses norms, RoPE and activations "
                            "as compile_decode does for decode (CUDA only). Compiled at start-up on all-padding "
                            "steps (seconds per worker), and steps are padded to >= 2 tokens and >= 2 logits rows "
                            "so sizes 0/1 never recompile: benchmarks/gpu_check.py --only compiled-prefill checks "
                            "tokens and that nothing compiles after the warm-up. H100, Llama-1B shape: a worker's "
                            "2048-token prefill step 17.0 -> 12.8 ms, TTFT p50 36.8 -> 32.5 ms (latency floor). "
                            "'auto' = on, except with attention_backend torch")
    fuse_projections: bool | Literal["auto"] = Field(
        "auto", description="Load-time module surgery: one GEMM for q/k/v and one for gate/up per layer "
                            "(workers/engine/fused_projections.py). 'auto' = on for CUDA (an H100 batch-1 "
                            "decode graph of the Llama-1B shape 1.63 -> 1.44 ms; gpu_check's bf16-1b-fused and "
                            "fused checks pass there), off on the CPU; a model with no such groups then runs "
                            "unfused (true: an error).")
    rope_table: bool = Field(
        True, description="Look RoPE's cos/sin up in a table made at load (workers/engine/rope_table.py) "
                          "instead of computing them from the positions in every forward, which "
                          "torch.compile repeats in each layer's kernel (H200, Llama-1B shape, batch 32: "
                          "101 us of a 1.32 ms decode step). Bitwise the module's values; RoPE types "
                          "whose frequencies change with the length (dynamic, longrope) keep the module.")
    tune_batch1: bool = Field(
        False, description="Compile the batch-1 decode graph under inductor's coordinate-descent tuning "
                           "(compile_decode, CUDA): inductor then computes each one-row projection as a tuned "
                           "reduction fused with the RMSNorm before it (and the SiLU product before down) "
                           "instead of a cuBLAS GEMM; larger batches keep cuBLAS. Opt-in until measured as "
                           "built: one H200 call with the tuning on for the whole decode compile gave a "
                           "batch-1 graph of 1.038 ms vs 1.130 (batch 32 1.293 vs 1.255: worse), while a "
                           "separate static batch-1 compile under it gave 1.169 vs 1.122 "
                           "(benchmarks/README.md). Costs start-up time.")
    gemv: bool = Field(
        False, description="Batch-1 decode projections: time cuBLAS against a Triton GEMV on each weight shape "
                           "at load and keep the faster in the decode CUDA graphs (workers/engine/gemv.py; CUDA "
                           "with cuda_graphs only). Opt-in: on an H100 it won 2-11 % per projection in isolation "
                           "but left the Llama-1B batch-1 graph at 1.40 ms (cuBLAS 1.39), and one "
                           "benchmarks/engine.py run with it hit an illegal memory access not reproduced since "
                           "(benchmarks/README.md).")
    warm_up: Literal["auto", "basic", "full"] = Field(
        "auto", description="Requests the engine runs while it starts (workers/engine/warm_up.py): "
                            "basic = one short prompt (the first prefill kernel compiles at start-up); full = also "
                            "a step of two prompts filling max_num_batched_tokens, then a mixed step (decode rows "
                            "beside a prompt chunk), so the kernels those shapes specialise compile before any user "
                            "request (a compile inside serving stalls every request of the worker); auto = full "
                            "on CUDA, basic on the CPU")
    fused_decode: bool | Literal["auto"] = Field(
        "auto", description="Decode steps of <= fused_decode_max_batch rows run as our own Triton kernels (norm + "
                            "GEMV + RoPE, the paged attention, GEMV + residual, norm + gate|up GEMV + SiLU, down + "
                            "residual; under programmatic dependent launch on sm_90+) instead of transformers' "
                            "modules, in the decode CUDA graphs (workers/engine/fused_decode.py; Llama, Mistral, "
                            "Qwen2, Qwen3; CUDA with cuda_graphs). 'auto' = on where the model is supported (the "
                            "reason logged where not); true: an unsupported model is an error. One H200, Llama-1B "
                            "shape: batch-1 decode graph 0.89 ms vs 1.14 ms through the modules (benchmarks/README.md)")
    fused_decode_max_batch: int = Field(
        1, ge=1, le=64, description="Largest decode batch engine.fused_decode runs: a GEMV per projection, "
                                    "applied to each row. Past 1 the modules' cuBLAS graph is about as fast at "
                                    "2 rows and faster from 8 (two tensor-core builds lost to it by 2-2.5x at "
                                    "2-32 rows on an H200: benchmarks/README.md)")
    async_scheduling: bool | Literal["auto"] = Field(
        "auto", description="Overlap the host's work for step n+1 (scheduling, staging) with the GPU running "
                            "step n: step n+1 is launched with its new input tokens read on the device from "
                            "step n's samples, then step n's tokens are read back; token deltas come one "
                            "step() later. 'auto' = on for CUDA (the host work then hides behind the GPU), "
                            "off on the CPU (a CPU step runs to completion when launched: nothing to "
                            "overlap). Token-identical to the synchronous path in every engine test; see "
                            "Engine.step for the steps that are always resolved at once.")

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.max_num_batched_tokens < self.max_num_seqs:
            # every running decode needs one token of budget per step
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})"
            )
        return self
