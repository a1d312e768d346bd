"""The packed inputs of one step: every scheduled token of every request in one row.

    request i:  tokens [c, c + n) of its sequence, c = num_computed_tokens, n = scheduled now
                [c, known) ids the host knows | [known, c + n) a pending token (async scheduling):
                a placeholder here, its id copied in on the device (TokenFill) from the step that
                sampled it
    sampled:    requests whose chunk reaches the end of their sequence (pending token included):
                their last packed token's logits are sampled
    prompt rows requests collecting prompt logprobs (workers/engine/prompt_logprobs.py): the
                chunk's positions [c, min(c + n, prompt - 1)), each scoring the next prompt token
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.attention import SeqSlice
from workers.engine.request import Request


@dataclass
class StepInputs:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    seqs: list[SeqSlice] = field(default_factory=list)
    logits_indices: list[int] = field(default_factory=list)  # packed rows to sample, one per sampled request
    sampled: list[Request] = field(default_factory=list)
    fill_rows: list[int] = field(default_factory=list)  # packed rows holding a pending token's placeholder
    fill_index: list[int] = field(default_factory=list)  # ... its row in the in-flight step's sample
    prompt_rows: list[int] = field(default_factory=list)  # packed rows whose logits score a prompt token
    prompt_targets: list[int] = field(default_factory=list)  # ... that token (the next one in the prompt)
    prompt_chunks: list[tuple[Request, int, int]] = field(default_factory=list)  # (request, first position, rows)

    @classmethod
    def pack(cls, requests: list[Request], num_new_tokens: list[int]) -> "StepInputs":
        s = cls()
        ids, positions, seqs, logits_indices, sampled = s.input_ids, s.positions, s.seqs, s.logits_indices, s.sampled
        q_start = 0  # len(ids)
        for req, n in zip(requests, num_new_tokens):
            c, known = req.num_computed_tokens, req.num_tokens
            num_prompt = len(req.prompt_token_ids)
            if n == 1 and c >= known - 1:
                # a decode: one token, the newest known one (c = known - 1) or a pending one (c = known)
                if c < known:
                    ids.append(req.output_token_ids[c - num_prompt] if c >= num_prompt else req.prompt_token_ids[c])
                else:
                    s.fill_rows.append(q_start)
                    s.fill_index.append(req.pending_row)
                    ids.append(0)
                positions.append(c)
            else:
                ids += req.token_ids(c, min(c + n, known))
                if c + n > known:  # at most one pending token, always the newest
                    s.fill_rows.append(len(ids))
                    s.fill_index.append(req.pending_row)
                    ids.append(0)
                positions += range(c, c + n)
            seqs.append(SeqSlice(q_start, n, c + n, req.block_ids, c < num_prompt))
            if req.prompt_logprobs is not None and c < num_prompt - 1:
                m = min(c + n, num_prompt - 1) - c
                s.prompt_rows += range(q_start, q_start + m)
                s.prompt_targets += req.prompt_token_ids[c + 1:c + 1 + m]
                s.prompt_chunks.append((req, c, m))
            q_start += n
            if c + n == known + req.num_pending:
                logits_indices.append(q_start - 1)
                sampled.append(req)
        return s
