"""Paged attention behind one seam, plugged into transformers' attention interface.

Each step packs every scheduled token of every request into one row ([1, num_tokens]); the
model's own attention modules compute q/k/v (and RoPE from our position ids), then call
``paged_attention_forward`` (registered as ``PAGED_ATTN``), which hands them to the step's
``AttentionBackend``: it writes the new K/V into the paged cache and attends over each
request's blocks.

Token ranges of one request inside a step:

    context:  [0, num_computed) from the cache | [num_computed, num_computed + q_len) new this step
    packed:   tokens [q_start, q_start + q_len) of the step's row
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from workers.engine.kv_cache import KVCache

PAGED_ATTN = "pdserve_paged"


@dataclass(frozen=True)
class SeqSlice:
    """One request's share of a step."""

    q_start: int  # first packed token
    q_len: int  # tokens computed this step
    ctx_len: int  # tokens of context after this step (cached + new)
    block_ids: tuple[int, ...]  # blocks covering [0, ctx_len)


class AttentionBackend(ABC):
    """Writes a step's K/V into the paged cache and computes attention. ``prepare`` runs once per
    step (batch metadata on the device), ``forward`` once per layer."""

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache

    @abstractmethod
    def prepare(self, seqs: list[SeqSlice], num_tokens: int) -> None: ...

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scaling: float, sliding_window: int | None) -> torch.Tensor:
        """q [1, Hq, T, D], k/v [1, Hkv, T, D] -> out [1, T, Hq, D]."""


class TorchPagedAttention(AttentionBackend):
    """Reference backend on any device: index_copy for the cache writes, a per-request gather of
    its blocks and torch SDPA with an explicit causal (and sliding-window) mask."""

    def prepare(self, seqs: list[SeqSlice], num_tokens: int) -> None:
        layout, device = self.kv_cache.layout, self.kv_cache.device
        bs, bps = layout.block_size, layout.blocks_per_segment
        self.seqs = seqs
        # cache writes, grouped by segment: packed token index -> flat slot inside the segment
        writes: dict[int, tuple[list[int], list[int]]] = {}
        # per request: (segment, local blocks) runs to gather, and the context positions
        self.gathers = []
        for s in seqs:
            first_new = s.ctx_len - s.q_len
            for i in range(s.q_len):
                pos = first_new + i
                seg, local = divmod(s.block_ids[pos // bs], bps)
                toks, slots = writes.setdefault(seg, ([], []))
                toks.append(s.q_start + i)
                slots.append(local * bs + pos % bs)
            nblk = -(-s.ctx_len // bs)
            segs = [divmod(b, bps) for b in s.block_ids[:nblk]]
            if all(seg == segs[0][0] for seg, _ in segs):
                plan = [(segs[0][0], torch.tensor([l for _, l in segs], device=device))]
            else:
                plan = [(seg, torch.tensor([l], device=device)) for seg, l in segs]
            q_pos = torch.arange(first_new, s.ctx_len, device=device)
            self.gathers.append((plan, q_pos))
        self.writes = [
            (seg, torch.tensor(toks, device=device), torch.tensor(slots, device=device))
            for seg, (toks, slots) in writes.items()
        ]
        self._mask_cache: dict[tuple[int, int | None], torch.Tensor | None] = {}

    def _mask(self, i: int, window: int | None) -> torch.Tensor | None:
        key = (i, window)
        if key not in self._mask_cache:
            s, (_, q_pos) = self.seqs[i], self.gathers[i]
            k_pos = torch.arange(s.ctx_len, device=q_pos.device)
            mask = k_pos[None, :] <= q_pos[:, None]
            if window is not None:
                mask &= (q_pos[:, None] - k_pos[None, :]) < window
            self._mask_cache[key] = None if bool(mask.all()) else mask
        return self._mask_cache[key]

    def forward(self, layer, q, k, v, scaling, sliding_window):
        kv = self.kv_cache
        k_t, v_t = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, Hkv, D]
        heads, dim = k_t.shape[1], k_t.shape[2]
        for seg, toks, slots in self.writes:
            cache = kv.layer_view(seg, layer)  # [2, nb, bs, Hkv, D]
            cache[0].view(-1, heads, dim).index_copy_(0, slots, k_t.index_select(0, toks).to(cache.dtype))
            cache[1].view(-1, heads, dim).index_copy_(0, slots, v_t.index_select(0, toks).to(cache.dtype))
        outs = []
        for i, s in enumerate(self.seqs):
            plan, _ = self.gathers[i]
            ks, vs = [], []
            for seg, locals_ in plan:
                cache = kv.layer_view(seg, layer)
                ks.append(cache[0].index_select(0, locals_))
                vs.append(cache[1].index_select(0, locals_))
            keys = torch.cat(ks).reshape(-1, heads, dim)[: s.ctx_len].transpose(0, 1)  # [Hkv, ctx, D]
            vals = torch.cat(vs).reshape(-1, heads, dim)[: s.ctx_len].transpose(0, 1)
            qs = q[0, :, s.q_start:s.q_start + s.q_len]  # [Hq, n, D]
            o = F.scaled_dot_product_attention(
                qs[None], keys[None].to(qs.dtype), vals[None].to(qs.dtype),
                attn_mask=self._mask(i, sliding_window), scale=scaling, enable_gqa=True,
            )
            outs.append(o[0].transpose(0, 1))  # [n, Hq, D]
        return torch.cat(outs)[None]


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    backend: AttentionBackend | None = kwargs.get("pdserve_backend")
    if backend is None:
        raise RuntimeError(f"{PAGED_ATTN} attention called without a pdserve backend (use ModelRunner)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention logit soft-capping / sinks are not supported by pdserve's paged attention")
    window = kwargs.get("sliding_window")
    out = backend.forward(module.layer_idx, query, key, value, scaling or module.scaling, window)
    return out, None


AttentionInterface.register(PAGED_ATTN, paged_attention_forward)
