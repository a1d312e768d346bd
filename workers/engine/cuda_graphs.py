"""CUDA graphs of the decode step: one graph per padded batch size, replayed with new inputs.

A decode-only step of n sequences runs the graph captured for the smallest size >= n; the extra
rows are empty sequences (no context, KV writes skipped) whose logits are ignored. Every input a
graph reads lives in the attention backend's fixed device buffers (token ids, positions, slots,
lengths, block ids) and is refilled by ONE host->device copy before the replay (plus, with async
scheduling, a device-side copy of the previous step's sampled tokens into the token-id rows); the
KV segment table is rewritten in place on resize. So a replay issues no host sync; the step's only
sync is reading the sampled token ids back.

Each graph also computes its rows' greedy argmax (workers/engine/argmax.py) after the logits: a
greedy step's sampler takes those (``greedy_ids``) and launches nothing of its own.

Graphs share one memory pool and are captured largest first, so smaller graphs reuse the
largest one's intermediate memory; replays never overlap (one engine thread).
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from workers.engine.attention import SeqSlice, TokenFill

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, backend, sizes: list[int], compile_model: bool = False,
                 tune_batch1: bool = False, fused=None):
        self.model = model
        self.backend = backend
        # engine.fused_decode (workers/engine/fused_decode.py): sizes up to fused.max_batch capture
        # its kernels instead of the model's forward
        self.fused = fused
        # compiled once with a symbolic batch size (batch 1 gets its own specialisation), then each
        # size is captured; the compiled code runs only inside captures and replays
        self.forward = torch.compile(self._forward, dynamic=True) if compile_model else self._forward
        # engine.tune_batch1: batch 1's specialisation of that compile runs under inductor's
        # coordinate-descent tuning, under which inductor computes a one-row matmul as a reduction
        # it fuses with the RMSNorm before it (and the SiLU product before down) and tunes; larger
        # batches keep cuBLAS, where the same tuning made the step slower (benchmarks/README.md)
        self.tune_batch1 = compile_model and tune_batch1
        self.sizes = sorted(sizes)
        # size -> (graph, its static fp32 logits [size, vocab], their greedy argmax [size] int64)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.num_replays = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # run()'s logits and their argmax

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=0,
                         pdserve_backend=self.backend)
        return out.logits[0].float()

    def forward_for(self, size: int):
        """What a graph of ``size`` rows captures: the fused decode step or the (compiled) model."""
        if self.fused is not None and size <= self.fused.max_batch:
            return self.fused
        return self.forward

    def _tuning(self, size: int):
        """The inductor settings a size's compile runs under (size 1 is compiled at its first call,
        in the warm-up, as its own specialisation): coordinate-descent tuning for batch 1 with
        engine.tune_batch1, else none."""
        if size == 1 and self.tune_batch1:
            import torch._inductor.config as inductor_config

            return inductor_config.patch(coordinate_descent_tuning=True)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def capture(self) -> None:
        from workers.engine.argmax import greedy_argmax  # Triton: imported where graphs are captured

        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(self.sizes, reverse=True):
            ids, pos, _ = self.backend.prepare([], [], [], None, pad_to=size)  # all padding rows
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), self._tuning(size):  # warm-up: Triton compiles, cuBLAS picks its kernels
                for _ in range(2):
                    self.forward_for(size)(ids, pos)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), self._tuning(size):
                logits = self.forward_for(size)(ids, pos)
                argmax = greedy_argmax(logits)
            self.graphs[size] = (graph, logits, argmax)
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.sizes, time.perf_counter() - t0)

    def fits(self, seqs: list[SeqSlice]) -> bool:
        # decodes only: a one-token prompt chunk runs eagerly, attended as prefill (SeqSlice.prompt)
        return 0 < len(seqs) <= self.max_batch and all(s.q_len == 1 and not s.prompt for s in seqs)

    def run(self, seqs: list[SeqSlice], input_ids: list[int], positions: list[int],
            logits_indices: list[int], fill: TokenFill | None = None) -> torch.Tensor:
        """fp32 logits [len(logits_indices), vocab] (rows of the graph's static output, valid until
        the next replay: consume them in stream order before that). ``fill`` writes device-only
        input tokens into the graph's static input buffer after the upload, before the replay."""
        size = next(s for s in self.sizes if s >= len(seqs))
        ids, pos, keep = self.backend.prepare(seqs, input_ids, positions, logits_indices, pad_to=size)
        if fill is not None:
            fill.apply(ids)
        logits, argmax = self._replay(size, ids, pos)
        self.num_replays += 1
        if logits_indices == list(range(len(seqs))):
            logits, argmax = logits[: len(seqs)], argmax[: len(seqs)]
        else:
            logits, argmax = logits.index_select(0, keep), argmax.index_select(0, keep)
        self._last = (logits, argmax)
        return logits

    def greedy_ids(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The greedy argmax of ``logits`` when they are what the last run() returned (computed in
        its graph, valid as long as the logits are), else None."""
        last = self._last
        return last[1] if last is not None and last[0] is logits else None

    def _replay(self, size: int, ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the graph of ``size`` over its static inputs (ids/pos are those buffers' views): its
        static logits and their argmax."""
        graph, logits, argmax = self.graphs[size]
        graph.replay()
        return logits, argmax
