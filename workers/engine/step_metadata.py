"""A TritonPagedAttention step's integers on the device.

Per step, every integer the GPU needs (token ids, positions, query blocks, per-sequence lengths,
KV addresses, logits rows) is packed on the host into one pinned buffer and sent with ONE
asynchronous copy into a device buffer of fixed layout. Regions sit at fixed offsets, so a
captured CUDA graph that reads them stays valid: a replay only needs the buffer refilled.

    int32: [ids T | pos T | keep T | qb_seq Q | qb_start Q |
            q_start S | q_len S | ctx S | blk_start S | dec_seq S | n_real 1]
    int64: [slot_off T | block_off B]
     T = max tokens per step, Q = T + S query blocks, S = max sequences, B = S * blocks per sequence
     dec_seq: the sequences of the step's decode rows (paged_decode_kernel) beside prefill chunks

KV addresses (slot_off, block_off) are element offsets from the backend's anchor tensor
(triton_attention.py); rows t >= n_real are padding and write nothing.
"""

from __future__ import annotations

import numpy as np
import torch


class StepMetadata:
    """Host staging + device copy of a step's integers (layout in the module docstring)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        self.T, self.S, self.Q = max_tokens, max_seqs, max_tokens + max_seqs
        i32 = [("ids", self.T), ("pos", self.T), ("keep", self.T), ("qb_seq", self.Q), ("qb_start", self.Q),
               ("q_start", self.S), ("q_len", self.S), ("ctx", self.S), ("blk_start", self.S), ("dec_seq", self.S),
               ("n_real", 1)]
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for name, n in i32:
            self.offsets[name] = (off, n)
            off += n
        off += off % 2  # int64 regions start 8-byte aligned
        self.i64_off = off
        self.offsets["slot_off"] = (off, 2 * self.T)
        self.blocks_off = off + 2 * self.T
        self.max_blocks = max_blocks
        self.size = self.blocks_off + 2 * max_blocks
        # Two pinned staging buffers, used in turn: with async scheduling the host stages step n+1
        # while step n's upload may still be queued behind step n-1 on the GPU, so the buffer
        # being written must not be the one that upload reads (an event guards each reuse).
        pin = device.type == "cuda"
        self._hosts = [torch.zeros(self.size, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._uploaded: list = [None, None]  # per buffer: event recorded after its last upload
        self._turn = 0
        self.host = self._hosts[0]
        self.np = self.host.numpy()
        self.dev = torch.zeros(self.size, dtype=torch.int32, device=device)
        self.dev_slot_off = self.dev[off:off + 2 * self.T].view(torch.int64)
        self.dev_block_off = self.dev[self.blocks_off:].view(torch.int64)

    def begin(self) -> None:
        """Switch to the other staging buffer before writing a step; waits (normally not at all)
        until the upload that last read it has run."""
        self._turn ^= 1
        event = self._uploaded[self._turn]
        if event is not None and not event.query():
            event.synchronize()
        self.host = self._hosts[self._turn]
        self.np = self.host.numpy()

    def host_view(self, name: str) -> np.ndarray:
        off, n = self.offsets[name]
        return self.np[off:off + n]

    def host_i64(self, name: str) -> np.ndarray:
        if name == "slot_off":
            return self.np[self.i64_off:self.blocks_off].view(np.int64)
        return self.np[self.blocks_off:].view(np.int64)

    def dev_view(self, name: str, n: int | None = None) -> torch.Tensor:
        off, cap = self.offsets[name]
        return self.dev[off:off + (cap if n is None else n)]

    def upload(self, num_blocks: int) -> None:
        """One host->device copy of everything written this step (non-blocking from pinned memory;
        the device buffer is overwritten in stream order, after the previous step's kernels)."""
        n = self.blocks_off + 2 * num_blocks
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        if self.dev.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._uploaded[self._turn] = event
