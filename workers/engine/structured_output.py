"""Structured output (constrained decoding) through xgrammar: a request's StructuredOutput (a JSON
schema, any JSON object, a regex, a choice of strings or an EBNF grammar) becomes a grammar matcher
that says, before each sampled token, which tokens keep the output inside the grammar.

    grammar_of(spec)           the spec as an xgrammar Grammar (no tokenizer): what the endpoint
                               checks a request with (a bad schema/regex/grammar is a 400)
    Grammars(tokenizer, ...)   an engine's compiler: matcher(spec) -> a GrammarMatcher for one
                               request; compiled grammars cached by spec
    GrammarState(matcher, reasoning)
                               a request's matcher after the reasoning it leaves free (a reasoning
                               model's <think> ... </think> before a constrained answer)
    fill_bitmasks(rows, vocab_size)
                               the next-token bitmask of each row (its grammar's next tokens, and
                               only those of its allowed_token_ids), int32 [n, ceil(vocab / 32)]
    apply_bitmask(logits, bitmask, rows)
                               those rows' disallowed tokens at -inf (out of place)

A matcher's state is the request's output so far: it accepts each token as the engine appends it,
and a request resumed elsewhere (imported after a remote prefill, migrated) replays the tokens it
already has, so a grammar holds across prefill and decode workers. The grammar ends only on one of
the model's EOS tokens (after the output is complete), which finishes the request with "stop".
"""

from __future__ import annotations

import collections
import json
import re
import threading

import numpy as np
import torch

from workers.protocol import InvalidRequestError, StructuredOutput

# whitespace runs a JSON grammar allows between tokens: enough for indented output, not enough
# for a model to loop in whitespace until max_tokens (a known pain with unbounded JSON grammars)
MAX_JSON_WHITESPACE = 32
_CACHE_SIZE = 256  # compiled grammars kept per engine


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # a dependency of pdserve: only a broken install gets here
        raise RuntimeError("structured output needs the xgrammar package: pip install xgrammar") from e
    return xgrammar


def grammar_of(spec: StructuredOutput):
    """The spec as an xgrammar Grammar; InvalidRequestError (param: the request field it came
    from) when the schema, regex or grammar does not parse."""
    xgr = _xgrammar()
    try:
        if spec.kind == "json_schema":
            return _json_strings_fixed(xgr, xgr.Grammar.from_json_schema(spec.spec, any_whitespace=True,
                                                                         max_whitespace_cnt=MAX_JSON_WHITESPACE))
        if spec.kind == "json_object":  # any JSON object (OpenAI's json_object mode)
            return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, any_whitespace=True,
                                                max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.spec)
        if spec.kind == "choice":
            choices = json.loads(spec.spec)
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
        if spec.kind == "grammar":
            return xgr.Grammar.from_ebnf(spec.spec)
    except (RuntimeError, ValueError, TypeError) as e:
        # xgrammar's messages start with its log prefix: "[08:12:16] /project/cpp/x.cc:94: "
        message = re.sub(r"^\[[0-9:]+\] \S+:[0-9]+: ", "", str(e).strip()) or type(e).__name__
        raise InvalidRequestError(f"the {spec.kind.replace('_', ' ')} for structured output is not valid: {message}",
                                  spec.param) from e
    raise InvalidRequestError(f"unknown structured output kind {spec.kind!r}", spec.param)


# xgrammar 0.2.9 writes a string with minLength/maxLength as [^"\\\r\n]{m,n}: raw control
# characters (a tab, \x0b) allowed inside it, which is not JSON (json.loads refuses it; a random
# model found it). Such classes become JSON's own: no character below 0x20, no quote, no backslash.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


def _json_strings_fixed(xgr, grammar):
    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)) if _LOOSE_STRING_CHAR in text \
        else grammar


class Grammars:
    """One engine's grammar compiler (its tokenizer's vocabulary, its EOS tokens as the grammars'
    end), built at the first structured request. Thread-safe: a worker may compile ahead of the
    engine thread, which then finds the grammar cached."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._compiler = None
        self._compiled: collections.OrderedDict[StructuredOutput, object] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0

    def _get_compiler(self):
        if self._compiler is None:
            xgr = _xgrammar()
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self._eos or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def compile(self, spec: StructuredOutput):
        with self._lock:
            hit = self._compiled.get(spec)
            if hit is not None:
                self._compiled.move_to_end(spec)
                return hit
            compiler = self._get_compiler()
        compiled = compiler.compile_grammar(grammar_of(spec))
        with self._lock:
            self._compiled[spec] = compiled
            self.num_compiled += 1
            while len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput):
        """A fresh matcher of the spec's grammar (one request's)."""
        return _xgrammar().GrammarMatcher(self.compile(spec))


class GrammarState:
    """One request's grammar matcher, after the reasoning it leaves free (ReasoningMarkers):

        phase None        the grammar holds: each token goes through the matcher
        phase "thinking"  free tokens until the end marker; the grammar holds from the next token
        phase "maybe"     the first output token: the start marker (-> thinking) or what the
                          grammar allows (-> None)

    ``accept_token`` / ``is_terminated`` as the matcher's; ``mask_parts()`` what fill_bitmasks
    needs."""

    __slots__ = ("matcher", "phase", "start", "end")

    def __init__(self, matcher, reasoning=None):
        self.matcher = matcher
        self.phase = None if reasoning is None else ("thinking" if reasoning.opened else "maybe")
        self.start, self.end = (reasoning.start, reasoning.end) if reasoning is not None else (None, None)

    def accept_token(self, token: int) -> bool:
        if self.phase == "thinking":
            if token == self.end:
                self.phase = None
            return True
        if self.phase == "maybe":
            if token == self.start:
                self.phase = "thinking"
                return True
            self.phase = None
        return self.matcher.accept_token(token)

    def is_terminated(self) -> bool:
        return self.phase is None and self.matcher.is_terminated()

    def resume(self, output_so_far, param: str) -> GrammarState:
        """Past the output tokens a resumed request already has (a migration, an import);
        InvalidRequestError (``param``: the request field) if they do not follow the grammar."""
        if not all(self.accept_token(int(t)) for t in output_so_far):
            raise InvalidRequestError("the output tokens this request resumes with do not follow its "
                                      "structured-output grammar", param)
        return self

    @property
    def constrains(self) -> bool:
        """Whether the next token is held to anything (not while thinking)."""
        return self.phase != "thinking"

    def mask_parts(self):
        """(matcher whose next tokens are allowed, or None: any token; one more allowed token or None)."""
        if not self.constrains:
            return None, None
        return self.matcher, (self.start if self.phase == "maybe" else None)


def fill_bitmasks(rows, vocab_size: int, pin: bool = False) -> torch.Tensor:
    """int32 [len(rows), ceil(vocab_size / 32)] on the CPU (in pinned memory with ``pin``: its
    upload to a GPU copies it once, not twice): bit j of row i set = token j allowed
    next. Each row is (GrammarState or None, static token bitmask or None): the tokens its
    grammar allows next (GrammarState.mask_parts), and only those of the static mask
    (allowed_token_ids). One matcher after another: on
    an H200 host (16 cores) xgrammar's BatchGrammarMatcher on 8 threads took 2.2 ms a step for 32
    JSON-schema matchers against 1.4 ms one by one, and Python threads gain nothing either."""
    mask = torch.full((len(rows), -(-vocab_size // 32)), -1, dtype=torch.int32, pin_memory=pin)
    for i, (grammar, static) in enumerate(rows):
        if grammar is not None:
            matcher, extra = grammar.mask_parts()
            if matcher is not None:
                matcher.fill_next_token_bitmask(mask, i)
            if extra is not None and extra < vocab_size:
                mask[i] |= token_bitmask((extra,), vocab_size)
        if static is not None:
            mask[i] &= static
    return mask


def token_bitmask(token_ids, vocab_size: int) -> torch.Tensor:
    """int32 [ceil(vocab_size / 32)]: the bits of these tokens set."""
    words = np.zeros(-(-vocab_size // 32), dtype=np.uint32)
    ids = np.asarray(sorted(set(token_ids)), dtype=np.int64)
    np.bitwise_or.at(words, ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)))
    return torch.from_numpy(words.view(np.int32).copy())


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """logits [n, vocab] with every token that ``bitmask`` (int32 [len(rows), words], on the
    device) does not allow at -inf in its row (``rows``: int64 row indices on the device; None:
    every row, in order); a new tensor (the model's own logits stay for the logprobs). Only the
    constrained rows are unpacked (a word is 32 tokens: the unpacked mask of a batch of 256 rows over
    a 128k vocabulary would be 131 MB of int32)."""
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    vocab = logits.shape[1]
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if allowed.shape[1] < vocab:  # tokens past the grammar's vocabulary: never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
    if rows is None:
        return logits.masked_fill(~allowed[:, :vocab], float("-inf"))
    sub = logits.index_select(0, rows).masked_fill(~allowed[:, :vocab], float("-inf"))
    return logits.index_copy(0, rows, sub)
