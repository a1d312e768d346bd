"""RoPE cos/sin from a table made at load (workers/engine/rope_table.py): bitwise the rotary
module's own values, the engine token-identical with and without it, dynamic RoPE left alone."""

import copy

import pytest
import torch

from tests.tiny_models import FAMILIES
from tests.workers.engine.helpers import GREEDY, PROMPTS, hf_greedy, hf_model, make_engine, run_all
from workers.engine.rope_table import RopeTable, use_rope_tables


@pytest.mark.parametrize("family", FAMILIES)
def test_table_is_bitwise_the_modules_values(tiny_checkpoint, family):
    model = copy.deepcopy(hf_model(tiny_checkpoint(family)))  # hf_model's are shared: change a copy
    original = copy.deepcopy(model.model.rotary_emb)
    assert use_rope_tables(model, 300, torch.float32) == 1
    assert isinstance(model.model.rotary_emb, RopeTable)
    positions = torch.tensor([[0, 1, 7, 64, 255, 299], [3, 3, 150, 2, 298, 0]])
    x = torch.zeros(1, dtype=torch.bfloat16)
    for got, want in zip(model.model.rotary_emb(x, positions), original(x, positions)):
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_engine_with_and_without_the_table_matches_generate(tiny_checkpoint, family):
    model_dir = tiny_checkpoint(family)
    want = {f"r{i}": hf_greedy(model_dir, p, GREEDY.max_tokens) for i, p in enumerate(PROMPTS)}
    for table in (True, False):
        engine = make_engine(model_dir, rope_table=table, max_num_batched_tokens=16)
        assert engine.runner.rope_tables == int(table)
        assert isinstance(engine.runner.model.model.rotary_emb, RopeTable) == table
        assert run_all(engine, PROMPTS) == want


def test_dynamic_rope_keeps_its_module(tiny_checkpoint):
    model = copy.deepcopy(hf_model(tiny_checkpoint("llama")))
    rotary = model.model.rotary_emb
    rotary.rope_type = "dynamic"  # frequencies that follow the sequence length: no fixed table
    assert use_rope_tables(model, 300, torch.float32) == 0
    assert model.model.rotary_emb is rotary


def test_a_table_too_large_keeps_the_module(tiny_checkpoint):
    from workers.engine import rope_table

    model = copy.deepcopy(hf_model(tiny_checkpoint("llama")))
    rotary = model.model.rotary_emb
    # 2 tables x positions x rotary dim (2 x inv_freq) x 4 bytes
    too_many = rope_table.MAX_TABLE_BYTES // (2 * 2 * rotary.inv_freq.numel() * 4) + 1
    assert use_rope_tables(model, too_many, torch.float32) == 0
    assert model.model.rotary_emb is rotary


def test_a_module_whose_values_differ_from_a_lookup_keeps_itself(tiny_checkpoint):
    """The load-time probe: a rotary module whose answer for a position depends on more than the
    position (here: scaled by how many positions it is given) is not replaced by a table."""
    model = copy.deepcopy(hf_model(tiny_checkpoint("llama")))
    rotary = model.model.rotary_emb
    plain = type(rotary).forward

    def forward(x, position_ids):
        cos, sin = plain(rotary, x, position_ids)
        return cos * position_ids.shape[-1], sin

    rotary.forward = forward
    assert use_rope_tables(model, 300, torch.float32) == 0
    assert model.model.rotary_emb is rotary
