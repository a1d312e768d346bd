"""RoPE's cos/sin looked up from a table made at load, not computed in every forward (issue 8).

transformers' rotary embedding computes cos/sin from the positions at each forward (position x
inv_freq, then cos and sin in fp32). Under torch.compile inductor fuses that computation into
every layer's rotation kernel, so a decode step evaluates it once per layer: on one H200 that
kernel took 101 µs of a batch-32 decode step's 1.32 ms (39 µs at batch 1; benchmarks/README.md).
RopeTable holds the module's own outputs for positions 0 .. max_len-1, computed once by the module
itself (so its RoPE variant and attention scaling are in them), and a forward is two lookups.
Each value is the same elementwise computation of the same position, so the table is bitwise what
the module returns in eager mode.

Only RoPE types whose inverse frequencies are fixed at load are tabled; "dynamic" and "longrope"
change them with the sequence length and keep the module.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# A table covers every position up to the context limit: past this size (a 1M-token context) the
# module stays (Llama-3.1-8B at 128k positions: 64 MiB)
MAX_TABLE_BYTES = 256 << 20


class RopeTable(nn.Module):
    """Drop-in for a rotary embedding module: forward(x, position_ids) -> (cos, sin) in x's dtype."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.register_buffer("cos", cos, persistent=False)  # [max_len, rotary dim]
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


def _tableable(module: nn.Module) -> bool:
    return (type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq")
            and getattr(module, "rope_type", "default") in STATIC_ROPE_TYPES)


@torch.no_grad()
def use_rope_tables(model: nn.Module, max_len: int, dtype: torch.dtype) -> int:
    """Replace each static rotary embedding module of ``model`` by its table; returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if _tableable(m)]
    for name, module in targets:
        size = 2 * max_len * 2 * module.inv_freq.numel() * dtype.itemsize
        if size > MAX_TABLE_BYTES:
            log.info("RoPE of %s computed per forward: a table of %d positions would take %d MiB (max_model_len "
                     "sets the positions)", name, max_len, size >> 20)
            return 0
    tabled = []
    for name, module in targets:
        device = module.inv_freq.device
        x = torch.empty(0, dtype=dtype, device=device)
        cos, sin = module(x, torch.arange(max_len, device=device)[None])
        table = RopeTable(cos[0].contiguous(), sin[0].contiguous())
        if not _same_as_module(table, module, x, max_len):
            log.info("RoPE of %s computed per forward: its module does not map positions to cos/sin one by one",
                     name)
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, table)
        tabled.append(name)
    if tabled:
        log.info("RoPE from tables of %d positions (%s)", max_len, ", ".join(tabled))
    return len(tabled)


def _same_as_module(table: RopeTable, module: nn.Module, x: torch.Tensor, max_len: int) -> bool:
    """The table gives the module's own answer for a batch of scattered positions (a module whose
    output for a position depends on anything else, e.g. multimodal RoPE over 3-row positions, is
    left alone)."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, max_len, (2, 17), generator=g).to(x.device)
    try:
        want = module(x, probe)
    except Exception:  # noqa: BLE001 - any module that cannot take [batch, tokens] positions keeps itself
        return False
    got = table(x, probe)
    return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))
