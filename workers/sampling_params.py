"""What a request asks of sampling (SamplingParams and its parts: structured output, reasoning
markers) and the limits its validate() holds it to. Carried inside GenerateRequest and
PrefillRequest; workers.protocol re-exports every name here, so messages import from one place."""

from __future__ import annotations

import math
from dataclasses import dataclass


class InvalidRequestError(ValueError):
    """A client mistake (bad prompt, bad parameter): maps to HTTP 400, never to a 5xx."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
MAX_STRUCTURED_SPEC_CHARS = 256 * 1024  # a structured-output schema, regex or grammar
MAX_TOP_LOGPROBS = 20  # top_logprobs and prompt_logprobs (OpenAI's and vLLM's default limit)
MIN_PRIORITY, MAX_PRIORITY = -2**31, 2**31 - 1  # SamplingParams.priority (an int32)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a request's output text (workers/engine/structured_output.py, xgrammar):

        json_schema  spec: a JSON schema, as JSON text (OpenAI's response_format json_schema)
        json_object  any JSON object (response_format json_object); spec unused
        regex        spec: a regular expression the whole output matches
        choice       spec: a JSON list of strings; the output is one of them
        grammar      spec: an EBNF grammar (xgrammar's dialect, GBNF-like; rule root)

    ``param``: the request field it came from (named in a 400 when the spec does not compile)."""

    kind: str
    spec: str = ""
    param: str = "response_format"

    KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

    def validate(self) -> None:
        if self.kind not in self.KINDS:
            raise InvalidRequestError(f"structured output kind must be one of {', '.join(self.KINDS)}, got "
                                      f"{self.kind!r}", self.param)
        if not isinstance(self.spec, str) or len(self.spec) > MAX_STRUCTURED_SPEC_CHARS:
            raise InvalidRequestError(f"a structured-output spec is a string of at most {MAX_STRUCTURED_SPEC_CHARS} "
                                      "characters", self.param)
        if self.kind != "json_object" and not self.spec:
            raise InvalidRequestError(f"the {self.kind} for structured output is empty", self.param)


@dataclass(frozen=True)
class ReasoningMarkers:
    """A reasoning model's markers as token ids (<think>, </think>; server.reasoning_parser): a
    structured-output constraint holds after the reasoning, which stays free. ``opened``: the
    prompt opened the reasoning (the chat template ends with the start marker); otherwise the
    model's first token may open it (the start marker, besides what the grammar allows)."""

    start: int
    end: int
    opened: bool = False

    def validate(self) -> None:
        ids = (self.start, self.end)
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids) or self.start == self.end:
            raise InvalidRequestError("reasoning markers must be two different token ids >= 0", "reasoning")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # vLLM's min_p: after temperature, tokens less likely than min_p x the most likely one's
    # probability are dropped (with top-k and before top-p); 0 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # logprob of each chosen token
    top_logprobs: int = 0  # also the k most likely tokens at each step
    # Penalties on tokens the request has seen (workers/engine/penalties.py), before temperature,
    # top-k, top-p and the greedy argmax. OpenAI: logits[t] -= frequency_penalty * count[t] +
    # presence_penalty * (count[t] > 0), count over the output tokens so far; 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's extra, transformers' RepetitionPenaltyLogitsProcessor: the logit of a token in the
    # prompt or the output is divided by it when positive, multiplied when negative; 1 = off
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) pairs added to the model's logits before
    # the penalties (vLLM's order); the engine checks the ids against its vocabulary
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's extra: until the request has this many output tokens, EOS (unless ignore_eos) and its
    # stop_token_ids cannot be sampled (stop strings still apply)
    min_tokens: int = 0
    # vLLM's text options: keep the stop string that ended the output; keep special tokens' text
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # vLLM's allowed_token_ids: only these tokens may be sampled (empty: any)
    allowed_token_ids: tuple[int, ...] = ()
    # Output tokens this request already produced elsewhere (a migrated request resumes with them
    # as the prompt's tail): seeded sampling draws the next token at output position
    # output_position_offset + i, so a migration does not change what a seed samples, and the
    # prompt's last output_position_offset tokens count as output for presence/frequency penalties.
    output_position_offset: int = 0
    # vLLM's prompt_logprobs (OpenAI echo + logprobs): None = off; k >= 0: the first TokenDelta
    # carries each prompt token's logprob given the tokens before it and the k most likely tokens
    # at each prompt position (TokenDelta.prompt_logprobs). The prompt is then computed in full
    # where the request decodes (no prefix-cache hit, no prefill worker: the router prefills it
    # locally), and a resumed request (migration) drops it: its first delta already carried them.
    prompt_logprobs: int | None = None
    # vLLM's priority extra (not sampling, but this is the carrier that reaches every engine a
    # request touches: prefill, decode, a migration's next decode worker): lower is served first.
    # Each engine admits waiting requests in (priority, arrival) order and preempts the running
    # request with the highest value (workers/engine/scheduler.py)
    priority: int = 0
    # structured output (OpenAI's response_format, vLLM's structured_outputs): every sampled token,
    # the prefill worker's first one included, keeps the output inside this grammar; the output
    # ends ("stop") when the grammar is complete and the model chose EOS
    structured: StructuredOutput | None = None
    # with ``structured``: the constraint starts after the model's reasoning (set by the endpoint
    # when server.reasoning_parser is on and the tokenizer has the markers as tokens of their own)
    reasoning: ReasoningMarkers | None = None

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}", "top_k")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                                      "top_logprobs")
        k = self.prompt_logprobs
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_LOGPROBS):
            raise InvalidRequestError(f"prompt_logprobs must be null or an integer in [0, {MAX_TOP_LOGPROBS}], "
                                      f"got {k!r}", "prompt_logprobs")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty", "stop")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -2 <= value <= 2):
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}", name)
        rp = self.repetition_penalty
        if not (isinstance(rp, (int, float)) and math.isfinite(rp) and rp > 0):
            raise InvalidRequestError(f"repetition_penalty must be a finite number > 0, got {rp!r}",
                                      "repetition_penalty")
        # (a migrated request's max_tokens is what is left: its min_tokens counts the offset too)
        total = self.max_tokens + (self.output_position_offset if isinstance(self.output_position_offset, int) else 0)
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= total:
            raise InvalidRequestError(f"min_tokens must be an integer in [0, max_tokens={total}], got "
                                      f"{self.min_tokens!r}", "min_tokens")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}",
                                      "logit_bias")
        seen = set()
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or isinstance(token, bool) or token < 0 or token in seen:
                raise InvalidRequestError(f"logit_bias keys must be distinct token ids >= 0, got {token!r}",
                                          "logit_bias")
            if not (isinstance(bias, (int, float)) and -100 <= bias <= 100):
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}",
                                          "logit_bias")
            seen.add(token)
        p = self.priority
        if not isinstance(p, int) or isinstance(p, bool) or not MIN_PRIORITY <= p <= MAX_PRIORITY:
            raise InvalidRequestError(f"priority must be an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {p!r}",
                                      "priority")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.allowed_token_ids):
            raise InvalidRequestError("allowed_token_ids must be token ids >= 0", "allowed_token_ids")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise InvalidRequestError("structured must be a StructuredOutput", "response_format")
            self.structured.validate()
            if self.min_tokens:  # the grammar may allow nothing but EOS before min_tokens
                raise InvalidRequestError("min_tokens cannot be combined with structured output", "min_tokens")
        if self.reasoning is not None:
            if not isinstance(self.reasoning, ReasoningMarkers):
                raise InvalidRequestError("reasoning must be ReasoningMarkers", "reasoning")
            self.reasoning.validate()
        if not isinstance(self.output_position_offset, int) or self.output_position_offset < 0:
            raise InvalidRequestError(f"output_position_offset must be an integer >= 0, got "
                                      f"{self.output_position_offset!r}", "output_position_offset")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias))
