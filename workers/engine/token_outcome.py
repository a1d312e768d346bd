"""What a token read back does to its request: whether it ends it (a stop token or string, a
completed grammar, max_tokens or the context) and the TokenDelta that carries it to the client.
Functions of the request and the model's limits; the engine takes a finished request out of its
scheduler (Engine._append_token), and the prefill side asks the same questions of a first token
before it pins the blocks (SplitPoints._pin)."""

from __future__ import annotations

from workers.engine.detokenizer import request_detokenizer
from workers.engine.request import Request
from workers.protocol import FinishReason, SamplingParams, TokenDelta


def next_is_last_by_length(req: Request, max_model_len: int) -> bool:
    """The request's next output token (the host's count) reaches max_tokens or the context."""
    return len(req.output_token_ids) + 1 >= req.sampling.max_tokens or req.num_tokens + 1 >= max_model_len


def is_stop_token(sp: SamplingParams, token_id: int, eos_token_ids) -> bool:
    """One of the request's stop_token_ids, or an EOS it does not ignore."""
    return token_id in sp.stop_token_ids or (not sp.ignore_eos and token_id in eos_token_ids)


def append_token(req: Request, token_id: int, logprob, tokenizer, eos_token_ids,
                 max_model_len: int) -> FinishReason | None:
    """Append the token (and its logprob) to the request's output and feed its detokenizer
    (made at its first token, given a tokenizer); the reason the token finishes the request, or
    None. The request's grammar, if any, has accepted the token already."""
    grammar_done = req.grammar is not None and req.grammar.is_terminated()  # complete, and the model chose EOS
    by_length = next_is_last_by_length(req, max_model_len)
    req.append_output(token_id)
    sp, detok = req.sampling, req.detok
    if detok is None and tokenizer is not None:
        detok = req.detok = request_detokenizer(tokenizer, sp, req.prompt_token_ids)
    finish = None
    if is_stop_token(sp, token_id, eos_token_ids) or grammar_done:
        finish = FinishReason.STOP
    elif detok is not None:
        detok.add([token_id])
        if detok.stopped:
            finish = FinishReason.STOP
    if finish is None and by_length:
        finish = FinishReason.LENGTH
    if logprob is not None:
        req.logprobs.append(logprob)
    return finish


def token_delta(req: Request, token_ids: tuple[int, ...], logprob, top, finish: FinishReason | None,
                error: str | None = None) -> TokenDelta:
    """The delta of the request's newest token(s): the text they complete, their logprobs where
    asked for, and on its first token the prompt logprobs its prefill computed."""
    text = req.detok.take_delta(final=finish is not None) if req.detok is not None else ""
    sp = req.sampling
    prompt_lps = prompt_tops = None
    if req.prompt_logprobs is not None and token_ids:  # the first token's delta
        prompt_lps, prompt_tops = req.prompt_logprobs.result()
        req.prompt_logprobs = None  # a later recompute (preemption) may use the prefix cache again
    return TokenDelta(
        request_id=req.request_id, token_ids=token_ids, text=text,
        logprobs=(logprob,) if logprob is not None and (sp.logprobs or sp.top_logprobs) else None,
        top_logprobs=(tuple(top),) if top else None, finish_reason=finish,
        num_prompt_tokens=len(req.prompt_token_ids), num_cached_tokens=req.num_cached_tokens, error=error,
        prompt_logprobs=prompt_lps, prompt_top_logprobs=prompt_tops,
    )
