"""What constrains a step's sampling besides the sampling parameters themselves: per row, the
tokens it may not choose yet (min_tokens) and the only tokens it may choose (a grammar,
allowed_token_ids). Built on the host for the rows of one step (Engine._launch) and applied on the
device by the Sampler, first of all."""

from __future__ import annotations

import torch

from workers.engine.request import Request, RequestStatus
from workers.engine.structured_output import fill_bitmasks


def allowed_masks(sampled: list[Request], vocab_size: int, pin: bool = False) -> tuple[list[int], torch.Tensor] | None:
    """(rows, int32 bitmask [len(rows), words] on the host, pinned with ``pin``) or None: the
    tokens each sampled row with a grammar or allowed_token_ids may take next
    (workers/engine/structured_output.py). A request with a grammar has every token on the host
    here (Engine._launch resolved the step in flight first); one that finished meanwhile (its
    token will be dropped) or that is still thinking (GrammarState: free until </think>) is left
    unmasked."""
    finished = RequestStatus.FINISHED
    rows = [i for i, r in enumerate(sampled) if r.status != finished and (
            r.allowed_mask is not None or (r.grammar is not None and r.grammar.constrains))]
    if not rows:
        return None
    if any(sampled[i].num_pending for i in rows if sampled[i].grammar is not None):
        raise RuntimeError("internal: a grammar-constrained request has a pending token")
    return rows, fill_bitmasks([(sampled[i].grammar, sampled[i].allowed_mask) for i in rows], vocab_size, pin=pin)


def min_tokens_bans(sampled: list[Request], positions: list[int], eos_token_ids, vocab_size: int
                    ) -> list[tuple[int, int]] | None:
    """(row, token) pairs the sampler must not choose now: EOS (unless ignore_eos) and the
    stop_token_ids of each request that has fewer than min_tokens output tokens (positions[i]:
    row i's output index, a pending token counted; after a migration, plus those generated
    before it). None when none has."""
    bans = None
    for i, (r, position) in enumerate(zip(sampled, positions)):
        sp = r.sampling
        if sp.min_tokens and sp.output_position_offset + position < sp.min_tokens:
            stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(eos_token_ids))
            bans = (bans or []) + [(i, t) for t in sorted(stops) if t < vocab_size]
    return bans
