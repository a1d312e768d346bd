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
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from workers.engine.device_transfer import upload
from workers.engine.kv_cache import KVCache

PAGED_ATTN = "pdserve_paged"


class SeqSlice(NamedTuple):
    """One request's share of a step (a tuple: one is made per request per step, cheaply)."""

    q_start: int  # first packed token
    q_len: int  # tokens computed this step
    ctx_len: int  # tokens of context after this step (cached + new)
    block_ids: tuple[int, ...]  # blocks covering [0, ctx_len): the engine passes exactly those (others may pass more)
    # the chunk starts inside the prompt. A one-token prompt chunk (a prefix-cache hit's remainder,
    # the recompute of a wholly cached prompt) is attended as prefill, not as a decode: a backend
    # with a decode kernel of its own (triton "split") computes a position alike in every run
    prompt: bool = False


@dataclass(frozen=True)
class TokenFill:
    """Input tokens that so far exist only on the device (async scheduling: the previous step
    sampled them and the host has not read them back). The step stages a placeholder at each of
    ``rows`` (indices into its packed tokens); ``apply`` overwrites them with ``source[index[j]]``,
    queued on the stream after the step's upload and before its forward pass: no host sync."""

    rows: tuple[int, ...]
    index: tuple[int, ...]
    source: torch.Tensor  # [n] int64 on the device: the previous step's sampled token ids

    def apply(self, ids: torch.Tensor) -> None:
        """ids: the step's device token ids [1, T] (the backend's input buffer), written in place."""
        n = len(self.rows)
        if self.rows == self.index and self.rows == tuple(range(n)):
            # a steady decode step: row i is fed the previous step's token i (one copy, nothing uploaded)
            ids[0, :n].copy_(self.source[:n])
            return
        idx = upload([self.rows, self.index], torch.int64, ids.device)
        ids[0].index_copy_(0, idx[0], self.source.index_select(0, idx[1]).to(ids.dtype))


# on_layer_written(layer, wait_written): layer ``layer``'s K/V of the step are in the cache once
# wait_written() returns (a no-op on CPU; on CUDA it waits for the write kernels queued so far).
LayerCallback = Callable[[int, Callable[[], None]], None]


def _nothing_to_wait_for() -> None:
    pass


class AttentionBackend(ABC):
    """Writes a step's K/V into the paged cache and computes attention. ``prepare`` runs once per
    step (batch metadata on the device), ``forward`` once per layer.

    ``on_layer_written`` (set by ModelRunner.execute for one eager step, never inside CUDA graphs)
    is called by ``forward`` right after it queued the cache write of its layer."""

    def __init__(self, kv_cache: KVCache):
        self.kv_cache = kv_cache
        self.on_layer_written: LayerCallback | None = None

    def _layer_written(self, layer: int) -> None:
        callback = self.on_layer_written
        if callback is None:
            return
        if self.kv_cache.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()  # after the write kernels on the current stream
            callback(layer, event.synchronize)
        else:
            callback(layer, _nothing_to_wait_for)

    @abstractmethod
    def prepare(self, seqs: list[SeqSlice], input_ids: list[int], positions: list[int],
                logits_indices: list[int] | None = None, pad_to: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage a step; returns the model's device inputs: ids [1, T], positions [1, T] and the
        packed rows whose logits are wanted. pad_to: only backends that support CUDA graphs."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scaling: float, sliding_window: int | None, softcap: float | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        """q [1, Hq, T, D], k/v [1, Hkv, T, D] -> out [1, T, Hq, D]. softcap: scores become
        softcap * tanh(scores / softcap) before the softmax (Gemma 2). sinks [Hq]: a learned logit
        per query head that joins every row's softmax and attends to nothing (gpt-oss)."""


def _attend(q, k, v, mask, scale: float, softcap: float | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA over [.., H, n, D] with GQA; with ``softcap`` or ``sinks`` the scores go as in
    transformers' eager attention, which SDPA cannot do: capped (softmax in fp32, then q's dtype),
    or with each head's sink logit as one more column of the softmax, dropped after it (softmax in
    q's dtype, as gpt-oss's eager attention does)."""
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    sink = sinks.to(scores.dtype).reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)
    both = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(both - both.amax(dim=-1, keepdim=True), dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


class TorchPagedAttention(AttentionBackend):
    """Reference backend on any device: index_copy for the cache writes, one gather of every block
    the step reads (per segment, then into step order), and torch SDPA per request with an
    explicit causal (and sliding-window) mask."""

    def prepare(self, seqs, input_ids, positions, logits_indices=None, pad_to=None):
        if pad_to is not None:
            raise ValueError("the torch attention backend does not pad steps (no CUDA graphs)")
        layout, device = self.kv_cache.layout, self.kv_cache.device
        bs, bps = layout.block_size, layout.blocks_per_segment
        self.seqs = seqs
        # every block the step reads, in step order: request i's blocks are gathered[blk_off[i]:...]
        nblk = [-(-s.ctx_len // bs) for s in seqs]
        blocks = torch.tensor([b for s, n in zip(seqs, nblk) for b in s.block_ids[:n]], dtype=torch.long)
        self.blk_off = [0]
        for n in nblk:
            self.blk_off.append(self.blk_off[-1] + n)
        # new tokens' cache slots: token t of request i is at context position ctx_len - q_len + t
        pos = torch.tensor(positions, dtype=torch.long)
        tok_seq = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([s.q_len for s in seqs]))
        tok_blk = blocks[torch.tensor(self.blk_off[:-1], dtype=torch.long)[tok_seq] + pos // bs]
        tok_seg, tok_slot = tok_blk // bps, (tok_blk % bps) * bs + pos % bs
        blk_seg, blk_local = blocks // bps, blocks % bps
        self.num_blocks = len(blocks)
        # (segment, rows of the step, slots or local blocks inside the segment), one entry per segment
        self.writes, self.reads = [], []
        for seg in torch.unique(blk_seg).tolist():
            if seg == int(blk_seg[0]) and bool((blk_seg == seg).all()):
                self.reads.append((seg, None, blk_local.to(device)))  # one segment: no reordering
            else:
                rows = torch.nonzero(blk_seg == seg).flatten()
                self.reads.append((seg, rows.to(device), blk_local[rows].to(device)))
            rows = torch.nonzero(tok_seg == seg).flatten()
            if len(rows):
                self.writes.append((seg, rows.to(device), tok_slot[rows].to(device)))
        self._mask_cache: dict[tuple[int, int | None], torch.Tensor | None] = {}
        self._plan_decode_batch(seqs, bs, device)
        ids = torch.tensor([input_ids], device=device)
        keep = torch.tensor(logits_indices if logits_indices is not None else [], dtype=torch.long, device=device)
        return ids, pos.to(device)[None], keep

    def _plan_decode_batch(self, seqs, bs: int, device) -> None:
        """One-token requests (decodes) attend in ONE padded SDPA call instead of one call each:
        request j's keys are rows dec_rows[j, :ctx_j] of the gathered context, padded (masked)."""
        dec = [i for i, s in enumerate(seqs) if s.q_len == 1]
        self.dec = dec if len(dec) > 1 else []
        if not self.dec:
            return
        ctx = torch.tensor([seqs[i].ctx_len for i in dec])
        lo = torch.tensor([self.blk_off[i] * bs for i in dec])
        width = int(ctx.max())
        k_pos = torch.arange(width)
        self.dec_valid = k_pos[None, :] < ctx[:, None]  # [n, width]
        self.dec_rows = (lo[:, None] + torch.where(self.dec_valid, k_pos[None, :], 0)).to(device)
        self.dec_ctx = ctx.to(device)
        self.dec_q = torch.tensor([seqs[i].q_start for i in dec], device=device)
        self.dec_valid = self.dec_valid.to(device)
        self._dec_masks: dict[int | None, torch.Tensor] = {}

    def _dec_mask(self, window: int | None) -> torch.Tensor:
        if window not in self._dec_masks:
            mask = self.dec_valid
            if window is not None:  # the query sits at position ctx - 1
                k_pos = torch.arange(mask.shape[1], device=mask.device)
                mask = mask & ((self.dec_ctx[:, None] - 1 - k_pos[None, :]) < window)
            self._dec_masks[window] = mask[:, None, None, :]  # [n, 1, 1, width]
        return self._dec_masks[window]

    def _mask(self, i: int, window: int | None) -> torch.Tensor | None:
        key = (i, window)
        if key not in self._mask_cache:
            s = self.seqs[i]
            if s.q_len == 1 and (window is None or s.ctx_len <= window):
                self._mask_cache[key] = None  # a decode token sees its whole context
                return None
            device = self.kv_cache.device
            q_pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len, device=device)
            k_pos = torch.arange(s.ctx_len, device=device)
            mask = k_pos[None, :] <= q_pos[:, None]
            if window is not None:
                mask &= (q_pos[:, None] - k_pos[None, :]) < window
            self._mask_cache[key] = None if bool(mask.all()) else mask
        return self._mask_cache[key]

    def _gather(self, cache_kv: int, layer: int) -> torch.Tensor:
        """[num_blocks, bs, Hkv, D]: the step's blocks of one layer's K (0) or V (1), in step order."""
        kv = self.kv_cache
        if len(self.reads) == 1 and self.reads[0][1] is None:
            seg, _, local = self.reads[0]
            return kv.layer_view(seg, layer)[cache_kv].index_select(0, local)
        first = kv.layer_view(self.reads[0][0], layer)[cache_kv]
        out = first.new_empty((self.num_blocks,) + first.shape[1:])
        for seg, rows, local in self.reads:
            out.index_copy_(0, rows, kv.layer_view(seg, layer)[cache_kv].index_select(0, local))
        return out

    def forward(self, layer, q, k, v, scaling, sliding_window, softcap=None, sinks=None):
        kv = self.kv_cache
        k_t, v_t = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [T, Hkv, D]
        heads, dim = k_t.shape[1], k_t.shape[2]
        for seg, toks, slots in self.writes:
            cache = kv.layer_view(seg, layer)  # [2, nb, bs, Hkv, D]
            cache[0].view(-1, heads, dim).index_copy_(0, slots, k_t.index_select(0, toks).to(cache.dtype))
            cache[1].view(-1, heads, dim).index_copy_(0, slots, v_t.index_select(0, toks).to(cache.dtype))
        self._layer_written(layer)
        keys_all = self._gather(0, layer).view(-1, heads, dim).to(q.dtype)
        vals_all = self._gather(1, layer).view(-1, heads, dim).to(q.dtype)
        bs = kv.layout.block_size
        out = q.new_empty((q.shape[2], q.shape[1], q.shape[3]))  # [T, Hq, D]
        if self.dec:
            qs = q[0].index_select(1, self.dec_q).transpose(0, 1)[:, :, None]  # [n, Hq, 1, D]
            keys = keys_all[self.dec_rows].transpose(1, 2)  # [n, Hkv, width, D]
            vals = vals_all[self.dec_rows].transpose(1, 2)
            o = _attend(qs, keys, vals, self._dec_mask(sliding_window), scaling, softcap, sinks)
            out.index_copy_(0, self.dec_q, o[:, :, 0])
        batched = set(self.dec)
        for i, s in enumerate(self.seqs):
            if i in batched:
                continue
            lo = self.blk_off[i] * bs
            keys = keys_all[lo:lo + s.ctx_len].transpose(0, 1)  # [Hkv, ctx, D]
            vals = vals_all[lo:lo + s.ctx_len].transpose(0, 1)
            qs = q[0, :, s.q_start:s.q_start + s.q_len]  # [Hq, n, D]
            o = _attend(qs[None], keys[None], vals[None], self._mask(i, sliding_window), scaling, softcap, sinks)
            out[s.q_start:s.q_start + s.q_len] = o[0].transpose(0, 1)  # [n, Hq, D]
        return out[None]


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    backend: AttentionBackend | None = kwargs.get("pdserve_backend")
    if backend is None:
        raise RuntimeError(f"{PAGED_ATTN} attention called without a pdserve backend (use ModelRunner)")
    out = backend.forward(module.layer_idx, query, key, value, scaling or module.scaling,
                          kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux"))
    return out, None


AttentionInterface.register(PAGED_ATTN, paged_attention_forward)
