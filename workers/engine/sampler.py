"""Token sampling for a batch on the device: penalties, greedy, temperature, top-k, top-p,
per-request seeds, logprobs. One batched pass for every row; the host uploads the rows' parameters
once and reads the result back once (``DeviceSample.result``), so a step can queue its sampling and
sync later.

Order, as vLLM's: min_tokens' bans (EOS and stop tokens at -inf), then logit_bias, repetition,
frequency and presence penalties on the model's logits (rows that have one:
workers/engine/penalties.py), then the greedy argmax or temperature, top-k, min-p, top-p and the
draw (top-k and min-p each keep the most likely tokens: either order gives the same set).
Logprobs are always those of the model's own logits (before any of these).

Seeded requests draw their randomness from (seed, output position), so the same seed gives the
same tokens whether the first token was sampled by a prefill worker and the rest by a decode
worker, or all by one engine, and whatever else shares the batch: a seeded row's noise comes from
its own generator, seeded per row, over a contiguous row of exactly the vocabulary's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.engine.device_transfer import Download, upload
from workers.engine.penalties import PenaltyRows
from workers.engine.structured_output import apply_bitmask
from workers.protocol import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float] | None  # of the chosen tokens (None if no request asked)
    top_logprobs: list[list[tuple[int, float]]] | None


class DeviceSample:
    """A batch's sampled tokens on the device (``token_ids``: the next step may feed them to the
    model without a sync) and their one copy to the host, already queued."""

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, top_counts: list[int] | None):
        self.token_ids = token_ids  # [n] int64, on the device
        self.top_counts = top_counts  # per row, how many top logprobs it asked for (None: no logprobs)
        self._download = Download(packed)

    @property
    def mark(self):
        """DeviceMark right after the sampling and its copy to the host."""
        return self._download.mark

    def result(self) -> SampleResult:
        host = self._download.result()  # the step's one device->host sync
        if self.top_counts is None:
            return SampleResult(host.tolist(), None, None)
        rows = host.tolist()  # float64 [n, 2 + 2k]: token, its logprob, k top ids, k top logprobs
        k = (len(rows[0]) - 2) // 2 if rows else 0
        token_ids = [int(r[0]) for r in rows]
        logprobs = [r[1] for r in rows]
        tops = None
        if k:
            tops = [list(zip(map(int, r[2:2 + c]), r[2 + k:2 + k + c])) for r, c in zip(rows, self.top_counts)]
        return SampleResult(token_ids, logprobs, tops)


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._unseeded = torch.Generator(device=device)
        self._unseeded.seed()
        self._seeded = torch.Generator(device=device)  # re-seeded per row: (seed, output position)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                 penalties: PenaltyRows | None = None) -> SampleResult:
        """logits [n, vocab]; positions[i] = index of the token being sampled in request i's output."""
        return self.sample(logits, params, positions, penalties).result()

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
               penalties: PenaltyRows | None = None, banned: list[tuple[int, int]] | None = None,
               allowed: tuple[list[int], torch.Tensor] | None = None,
               argmax: torch.Tensor | None = None) -> DeviceSample:
        """Queue the sampling of every row; no host sync (see ``DeviceSample``). ``penalties``: the
        batch's penalised rows (TokenCounts.rows), None when it has none; their chosen tokens are
        counted on the device before this returns. ``banned``: (row, token) pairs that row must not
        choose (min_tokens: EOS and stop tokens), first of all; ``allowed``: (rows, int32 bitmask
        [len(rows), words] on the host), the only tokens those rows may choose (structured output's
        grammars, allowed_token_ids), as first; logprobs stay the model's. ``argmax``: the rows'
        argmax of ``logits`` if already computed (the decode graphs do): the greedy rows' tokens
        when no ban, mask or penalty changes the logits."""
        logits = raw = logits.float()
        if allowed is not None:
            rows, bitmask = allowed
            bitmask = upload(bitmask, torch.int32, logits.device)
            logits = apply_bitmask(logits, bitmask, None if len(rows) == len(params) else
                                   upload(rows, torch.int64, logits.device))
        if banned:
            rows, tokens = upload(list(zip(*banned)), torch.int64, logits.device)
            logits = logits.index_put((rows, tokens), torch.tensor(float("-inf"), device=logits.device))
        if penalties is not None:
            logits = penalties.apply(logits)
        greedy = [p.is_greedy for p in params]
        unchanged = allowed is None and not banned and penalties is None
        chosen = argmax if argmax is not None and unchanged else logits.argmax(dim=-1)
        if not all(greedy):
            sampled = self._sample_rows(logits, params, positions, greedy)
            if any(greedy):
                mask = upload(greedy, torch.bool, logits.device)
                chosen = torch.where(mask, chosen, sampled)
            else:
                chosen = sampled
        if penalties is not None:
            penalties.count(chosen)
        if not any(p.logprobs or p.top_logprobs for p in params):
            return DeviceSample(chosen, chosen, None)
        logprobs = torch.log_softmax(raw, dim=-1)
        cols = [chosen[:, None].double(), logprobs.gather(1, chosen[:, None]).double()]
        k = max(p.top_logprobs for p in params)
        if k:
            vals, ids = logprobs.topk(k, dim=-1)
            cols += [ids.double(), vals.double()]
        # one tensor, so one copy: float64 holds token ids (< 2^53) and fp32 logprobs exactly
        return DeviceSample(chosen, torch.cat(cols, dim=1), [p.top_logprobs for p in params])

    def _sample_rows(self, logits: torch.Tensor, params: list[SamplingParams], positions: list[int],
                     greedy: list[bool]) -> torch.Tensor:
        """Temperature, top-k, min-p, top-p and Gumbel-max for every row (greedy rows get neutral
        parameters; the caller keeps their argmax). Each op is the row-wise batched form of the
        per-request reference (tests/workers/engine/sampler_reference.py) and gives the same
        values: on CUDA ``x / python_float`` is computed as ``x * (1/t in fp32)``, so the
        reciprocal is uploaded there; on the CPU it is a true division."""
        n, vocab = logits.shape
        device = logits.device
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_ks = [p.top_k if (not g and 0 < p.top_k < vocab) else 0 for p, g in zip(params, greedy)]
        top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        if device.type == "cuda":
            inv = np.float32(1.0) / np.asarray(temps, dtype=np.float32)
            row = upload(torch.from_numpy(np.stack([inv, np.asarray(top_ps, np.float32)])), torch.float32, device)
            logits = logits * row[0][:, None]
        else:
            row = upload([temps, top_ps], torch.float32, device)
            logits = logits / row[0][:, None]
        if any(top_ks):
            k_max = max(top_ks)
            kth_index = upload([[max(k, 1) - 1] for k in top_ks], torch.int64, device)
            kth = logits.topk(k_max, dim=-1).values.gather(1, kth_index)  # the k-th largest value
            if not all(top_ks):
                off = upload([[k == 0] for k in top_ks], torch.bool, device)
                kth = kth.masked_fill(off, float("-inf"))  # top-k off: keep everything
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        if any(min_ps):  # vLLM's min_p: below min_p x the row's top probability, dropped
            floor = upload([[m] for m in min_ps], torch.float32, device) * probs.amax(dim=-1, keepdim=True)
            kept = probs.masked_fill(probs < floor, 0.0)
            kept = kept / kept.sum(dim=-1, keepdim=True)
            if all(min_ps):
                probs = kept
            else:  # rows without min_p keep their probs untouched (no renormalisation rounding)
                use = upload([[m > 0] for m in min_ps], torch.bool, device)
                probs = torch.where(use, kept, probs)
        if any(p < 1.0 for p in top_ps):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            cum = sorted_probs.cumsum(-1)
            # keep the smallest prefix whose mass reaches top_p (always the first token)
            drop = (cum - sorted_probs) >= row[1][:, None]
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            nucleus = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
            nucleus = nucleus / nucleus.sum(dim=-1, keepdim=True)
            if all(p < 1.0 for p in top_ps):
                probs = nucleus
            else:  # rows without top-p keep their probs untouched (no renormalisation rounding)
                use = upload([[p < 1.0] for p in top_ps], torch.bool, device)
                probs = torch.where(use, nucleus, probs)
        # Gumbel-max via exponential noise: argmax(p / E), E ~ Exp(1), same law as multinomial
        noise = torch.empty_like(probs)
        seeded = [i for i, p in enumerate(params) if p.seed is not None and not greedy[i]]
        if len(seeded) < n:
            noise.exponential_(generator=self._unseeded)
        for i in seeded:
            p = params[i]
            self._seeded.manual_seed((p.seed * 1_000_003 + p.output_position_offset + positions[i]) % (2**63))
            noise[i].exponential_(generator=self._seeded)
        return (probs / noise).argmax(dim=-1)
