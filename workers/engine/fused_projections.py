"""Load-time module surgery: one GEMM where transformers' modules run several over the same input.

A decoder layer computes q_proj(x), k_proj(x), v_proj(x) and gate_proj(x), up_proj(x): five
GEMMs, two of them (k, v) tiny. At batch 1 each is a matrix-vector product bound by reading its
weight, and small ones reach a poor fraction of the memory bandwidth. Fusing them into one weight
per group (q|k|v, gate|up) reads the same bytes in two larger GEMMs.

No model code is copied: each Linear of a group is replaced by a ``FusedSlice`` that the model's
own forward calls as before. The group's FIRST member runs the fused GEMM and keeps the result;
the others return their column slice of it. This relies on transformers' order of calls (q, then
k, then v on the same hidden states; gate before up in ``act_fn(gate_proj(x)) * up_proj(x)``),
which holds for every family in TESTED_MODEL_TYPES; a member called before its group's first
raises instead of reading a stale result.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.engine.gemv import linear

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(nn.Module):
    """The concatenated weight (and bias) of a group, [sum(out_features), in_features]."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.cat([m.weight.data for m in linears]), requires_grad=False)
        has_bias = linears[0].bias is not None
        self.bias = nn.Parameter(torch.cat([m.bias.data for m in linears]), requires_grad=False) if has_bias else None
        self.splits = [m.out_features for m in linears]
        self.last: torch.Tensor | None = None  # the fused output of the current call, until its last member read it
        self.gemv_cfg = None  # set by gemv.choose(): the batch-1 kernel of this weight (None = F.linear)


class FusedSlice(nn.Module):
    """Stands in for member ``index`` of a fused group (a Linear with out_features columns)."""

    def __init__(self, group: FusedLinear, index: int):
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: the weight is registered once, on the parent
        self.index = index
        self.start = sum(group.splits[:index])
        self.out_features = group.splits[index]
        self.is_last = index == len(group.splits) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if self.index == 0:
            group.last = linear(x, group.weight, group.bias, group.gemv_cfg)
        elif group.last is None:
            raise RuntimeError("fused projection called before its group's first member (the model's forward "
                               "changed its call order); set engine.fuse_projections: false")
        out = group.last[..., self.start:self.start + self.out_features]
        if self.is_last:
            group.last = None
        return out


def _fusable(linears) -> bool:
    if not all(type(m) is nn.Linear for m in linears):
        return False
    first = linears[0]
    return all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device and (m.bias is None) == (first.bias is None)
               for m in linears)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of plain Linears in place; returns how many groups."""
    count = 0
    for module in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(module, n, None) for n in names]
            if any(m is None for m in linears) or not _fusable(linears):
                continue
            fused = FusedLinear(linears)
            module.add_module("_".join(n.removesuffix("_proj") for n in names) + "_fused", fused)
            for i, name in enumerate(names):
                setattr(module, name, FusedSlice(fused, i))
            count += 1
    return count
