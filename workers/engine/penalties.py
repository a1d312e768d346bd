"""Logit bias, presence, frequency and repetition penalties (SamplingParams): the token counts of
every penalised request, kept on the device, and their batched application to a step's logits.

    logit_bias  x[t] += bias[t]                                (OpenAI's logit_bias, first, as vLLM)
    repetition  x[t] = x[t] / r if x[t] >= 0 else x[t] * r   for t in the prompt or the output so far
                (transformers' RepetitionPenaltyLogitsProcessor; r = repetition_penalty)
    OpenAI      x[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)
                count[t]: how many of the request's output tokens so far are t

in that order (vLLM's), on the model's logits before temperature, top-k, top-p and the greedy
argmax (Sampler.sample). Logprobs stay those of the model's own logits (vLLM's default).

    output tokens = prompt[len(prompt) - output_position_offset:] + output_token_ids

(a migrated request resumes with what it generated elsewhere as its prompt's tail: those tokens
keep counting as output, so the migrated stream goes on exactly as the undisturbed one would).

Why on the device: with async scheduling a request's newest token may be pending (sampled, not
read back) when its next step is launched. A penalised request holds a slot, one row of the
device tables (``output_counts``, ``in_prompt``, ``params``, ``bias``), filled from its host token lists
and its SamplingParams at its first sampling step in this engine (no token of it is pending then:
only this engine's steps make pending tokens); from then on every token sampled for it is counted
on the device right behind its sampling (PenaltyRows.count). A step thus sees every token sampled
before it, read back or not, and never waits for the host: penalised requests keep the overlap.
Steps with no penalised request do none of this (one scan of a per-request flag).

Slots of finished or pinned (prefill-only: sampled once) requests are reclaimed when a new
request needs one. A step still queued may count a dropped token into such a slot; the device
runs that before the new owner's fill, which is queued after it.
"""

from __future__ import annotations

import numpy as np
import torch

from workers.engine.device_transfer import upload
from workers.engine.request import Request, RequestStatus


class PenaltyRows:
    """The penalised rows of one step's sampled batch, on the device: what their penalties need."""

    def __init__(self, counts: "TokenCounts", rows: list[int], slots: list[int], num_rows: int,
                 any_repetition: bool, any_openai: bool, any_bias: bool = False):
        self.counts = counts
        index = upload([rows, slots], torch.int64, counts.device)  # one upload
        self.rows = None if len(rows) == num_rows else index[0]  # None: every row
        self.slots = index[1]
        self.any_repetition, self.any_openai = any_repetition, any_openai  # skip the other's ops when off
        self.any_bias = any_bias

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, vocab] float32 -> a new tensor, the penalised rows penalised, the others as they were.
        Each op is the row-wise form of the per-request definition (tests/workers/engine/sampler_reference.py
        ``penalize``) and gives the same values; a row's neutral parameter (r = 1, a zero penalty)
        leaves its logits exactly as they are."""
        c, slots = self.counts, self.slots
        x = logits if self.rows is None else logits.index_select(0, self.rows)
        if self.any_bias:
            x = x + c.bias.index_select(0, slots)
        if not (self.any_repetition or self.any_openai):
            return x if self.rows is None else logits.index_copy(0, self.rows, x)
        counts = c.output_counts.index_select(0, slots)  # [m, vocab] float32
        present = counts > 0
        params = c.params.index_select(0, slots)  # [m, 4]
        if self.any_repetition:
            rep, inv = params[:, 0:1], params[:, 1:2]
            # on CUDA ``x / python_float`` is ``x * (1/r in fp32)`` (as transformers' processor gets
            # it there), so the reciprocal multiplies there; on the CPU it is a true division
            divided = x * inv if x.device.type == "cuda" else x / rep
            seen = present | c.in_prompt.index_select(0, slots)
            x = torch.where(seen, torch.where(x < 0, x * rep, divided), x)
        if self.any_openai:
            x = x - (params[:, 2:3] * counts + params[:, 3:4] * present)
        return x if self.rows is None else logits.index_copy(0, self.rows, x)

    def count(self, token_ids: torch.Tensor) -> None:
        """Add the step's chosen tokens (token_ids [n], on the device) to the penalised rows' counts."""
        chosen = token_ids if self.rows is None else token_ids.index_select(0, self.rows)
        self.counts.output_counts.index_put_((self.slots, chosen), self.counts.one, accumulate=True)


class TokenCounts:
    """Per penalised request, on the device: how often each token is among its output tokens, which
    tokens its prompt holds, and its penalty parameters. Allocated at the first penalised request."""

    def __init__(self, vocab_size: int, device: torch.device, num_slots: int = 8):
        self.vocab_size = vocab_size
        self.device = device
        self._initial_slots = num_slots
        self.output_counts: torch.Tensor | None = None  # [num_slots, vocab] float32 (exact below 2^24)
        self.in_prompt: torch.Tensor | None = None  # [num_slots, vocab] bool
        self.bias: torch.Tensor | None = None  # [num_slots, vocab] float32: logit_bias, 0 elsewhere
        # [num_slots, 4] float32: repetition penalty, its fp32 reciprocal, frequency, presence
        self.params: torch.Tensor | None = None
        self.one = torch.ones((), dtype=torch.float32, device=device)
        self.slots: dict[Request, int] = {}
        self.free_slots: list[int] = []

    @property
    def num_slots(self) -> int:
        return 0 if self.output_counts is None else self.output_counts.shape[0]

    def rows(self, requests: list[Request]) -> PenaltyRows | None:
        """What the penalties of a step's sampled requests (row i samples requests[i]) need; None
        when none of them has a penalty (the common case costs one scan of a flag). A request
        that finished after the step's forward was queued (Engine._launch resolves the step in flight
        there for a grammar) is left out: its token is dropped, and _take_slot may hand its slot on."""
        rows = [i for i, r in enumerate(requests) if r.has_penalties and r.status != RequestStatus.FINISHED]
        if not rows:
            return None
        slots, any_repetition, any_openai, any_bias = [], False, False, False
        for i in rows:
            req = requests[i]
            slot = self.slots.get(req)
            slots.append(self._fill(req) if slot is None else slot)
            sp = req.sampling
            any_repetition = any_repetition or sp.repetition_penalty != 1
            any_openai = any_openai or sp.frequency_penalty != 0 or sp.presence_penalty != 0
            any_bias = any_bias or bool(sp.logit_bias)
        return PenaltyRows(self, rows, slots, len(requests), any_repetition, any_openai, any_bias)

    def _fill(self, req: Request) -> int:
        if req.num_pending:
            raise RuntimeError(f"internal: {req.request_id} has a pending token but no penalty counts")
        slot = self._take_slot()
        self.slots[req] = slot
        prompt, k, sp = req.prompt_token_ids, req.sampling.output_position_offset, req.sampling
        outputs = prompt[max(len(prompt) - k, 0):] + req.output_token_ids
        v, device = self.vocab_size, self.device
        self.in_prompt[slot] = torch.bincount(upload(prompt, torch.int64, device), minlength=v) > 0
        self.output_counts[slot] = torch.bincount(upload(outputs, torch.int64, device), minlength=v)
        rep = np.float32(sp.repetition_penalty)
        row = np.array([rep, np.float32(1.0) / rep, sp.frequency_penalty, sp.presence_penalty], np.float32)
        self.params[slot] = upload(torch.from_numpy(row), torch.float32, device)
        self.bias[slot] = 0
        if sp.logit_bias:
            ids, values = zip(*sp.logit_bias)
            self.bias[slot].index_put_((upload(list(ids), torch.int64, device),),
                                       upload(list(values), torch.float32, device))
        return slot

    def _take_slot(self) -> int:
        if not self.free_slots:
            done = (RequestStatus.FINISHED, RequestStatus.PINNED)
            for req in [r for r in self.slots if r.status in done]:
                self.free_slots.append(self.slots.pop(req))
        if not self.free_slots:
            self._grow()
        return self.free_slots.pop()

    def _grow(self) -> None:
        old, v = self.num_slots, self.vocab_size
        new = max(2 * old, self._initial_slots)
        tables = (torch.zeros(new, v, dtype=torch.float32, device=self.device),
                  torch.zeros(new, v, dtype=torch.bool, device=self.device),
                  torch.ones(new, 4, dtype=torch.float32, device=self.device),
                  torch.zeros(new, v, dtype=torch.float32, device=self.device))
        if old:
            for grown, table in zip(tables, (self.output_counts, self.in_prompt, self.params, self.bias)):
                grown[:old] = table
        self.output_counts, self.in_prompt, self.params, self.bias = tables
        self.free_slots.extend(range(new - 1, old - 1, -1))
