"""Fixtures of the worker-side tests (tests/workers/engine/ has its own)."""

import pytest

from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.engine import Engine


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """A small synchronous CPU engine on the tiny llama (one per test module)."""
    cfg = EngineConfig(block_size=4, num_kv_blocks=128, blocks_per_segment=16, max_num_batched_tokens=64,
                       max_num_seqs=8, async_scheduling=False)
    return Engine(ModelConfig(device="cpu", dtype="float32"), cfg, tiny_checkpoint("llama"), worker_id="e")
