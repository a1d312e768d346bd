"""vLLM's prompt_logprobs (SamplingParams.prompt_logprobs): each prompt token's logprob given the
tokens before it, computed during the request's prefill, chunk by chunk, and handed out with its
first token (TokenDelta.prompt_logprobs).

    prompt      t0   t1   t2   ...   t[n-2]   t[n-1]   | first output token
    position    0    1    2          n-2      n-1
    the logits at position p score t[p+1]: rows [0, n-1) give the logprobs of t1 .. t[n-1]
    (t0 has no prefix: None); row n-1 is the sampled row, as for any request

A chunk [c, c + m) of the prompt contributes rows [c, min(c + m, n - 1)). The model's head runs on
those rows' final hidden states ROWS_PER_HEAD_CALL rows at a time, so a long prompt never holds a
[prompt, vocab] logits tensor; each call's fp32 log-softmax is gathered at the next prompt token
and reduced to the top k at once. The values are the model's own, as the per-token logprobs
(before logit_bias, penalties, temperature).
"""

from __future__ import annotations

import torch

from workers.engine.device_transfer import Download, upload

ROWS_PER_HEAD_CALL = 256  # [256, vocab] fp32 at a time: 128 MiB for a 128k vocabulary


@torch.inference_mode()
def score_rows(head: torch.nn.Module, hidden: torch.Tensor, targets: list[int], k: int) -> torch.Tensor:
    """Row i: [logprob of targets[i], k top token ids, their k logprobs] as float64 (it holds fp32
    values and token ids exactly), on hidden's device; queued, no host sync. hidden [R, H]."""
    target = upload(targets, torch.int64, hidden.device)[:, None]
    parts = []
    for i in range(0, len(targets), ROWS_PER_HEAD_CALL):
        logprobs = head(hidden[i:i + ROWS_PER_HEAD_CALL]).float().log_softmax(dim=-1)
        cols = [logprobs.gather(1, target[i:i + ROWS_PER_HEAD_CALL]).double()]
        if k:  # (max: topk's radix select costs ~5x a log-softmax on a 128k vocabulary, H200)
            vals, ids = (logprobs.max(dim=-1, keepdim=True) if k == 1
                         else logprobs.topk(min(k, logprobs.shape[-1]), dim=-1))
            cols += [ids.double(), vals.double()]
        parts.append(torch.cat(cols, dim=1))
    return torch.cat(parts)


class PromptLogprobs:
    """One request's prompt logprobs while its prefill runs: each chunk's rows, their copy to the
    host already queued (no sync at launch, as the sampler's), read once by ``result()`` when the
    first token is (its step ran after every chunk, so the copies are done)."""

    def __init__(self, num_prompt_tokens: int, k: int):
        self.num_rows = num_prompt_tokens - 1  # positions [0, n-1) score t1 .. t[n-1]
        self.k = k
        self.chunks: list[tuple[int, Download]] = []  # (first position, its rows), in position order

    def add(self, start: int, rows: torch.Tensor) -> None:
        """The rows of positions [start, start + len(rows)). A chunk from 0 starts over (the
        request was preempted and recomputes its prompt)."""
        if start == 0:
            self.chunks = []
        self.chunks.append((start, Download(rows)))

    def result(self) -> tuple[tuple[float | None, ...], tuple | None]:
        """(prompt_logprobs, prompt_top_logprobs) as TokenDelta carries them."""
        logprobs: list[float | None] = [None]
        tops: list[tuple | None] = [None]
        for start, download in self.chunks:
            if start != len(logprobs) - 1:
                raise RuntimeError(f"internal: prompt logprob rows from {start}, expected {len(logprobs) - 1}")
            rows = download.result().tolist()
            width = (len(rows[0]) - 1) // 2 if rows else 0  # the step's top k (its largest request k)
            k = min(self.k, width)
            for r in rows:
                logprobs.append(r[0])
                if self.k:
                    tops.append(tuple(zip(map(int, r[1:1 + k]), r[1 + width:1 + width + k])))
        if len(logprobs) - 1 != self.num_rows:
            raise RuntimeError(f"internal: {len(logprobs) - 1} prompt logprob rows of {self.num_rows}")
        return tuple(logprobs), (tuple(tops) if self.k else None)
