"""OpenAI-compatible request/response schemas (the subset pdserve serves, plus a few extras that
vLLM and TensorRT-LLM also accept: top_k, repetition_penalty, ignore_eos, stop_token_ids, cache_salt,
priority, structured_outputs and its older guided_* fields)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints, field_validator,
                      model_validator)

from router.output_constraints import ResponseFormat, StructuredOutputs, one_constraint
from workers.protocol import MAX_LOGIT_BIAS, MAX_PRIORITY, MIN_PRIORITY, StructuredOutput


# OpenAI allows 4; vLLM any number, and lm-eval-harness's completions requests send a task's whole
# `until` list (plus the EOS string) unsliced
MAX_STOP_SEQUENCES = 16


class _Request(BaseModel):  # booleans are JSON booleans (StrictBool): 0.0 or "yes" is a 400, as at OpenAI
    # Unknown fields are ignored (clients send many optional OpenAI fields); fields we cannot
    # honour are rejected explicitly below rather than silently ignored.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128, description="Choices to generate for the prompt (OpenAI's limit: 128); each "
                                                "runs as a request of its own (at most limits.max_concurrent_requests)")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="Up to 16 strings (OpenAI: 4) that end the text")
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False,
                                    description="Subtracted from the logit of each token already in the output")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False,
                                     description="Times how often a token is in the output, subtracted from its logit")
    user: str | None = None
    response_format: ResponseFormat | None = Field(
        None, description="OpenAI's: text (default), json_object (any JSON object) or json_schema (output that "
                          "follows json_schema.schema); enforced token by token (xgrammar)")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: exactly one of json (a schema), json_object, regex, choice, grammar (EBNF)")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older form of structured_outputs.json")
    guided_regex: str | None = Field(None, description="vLLM's older form of structured_outputs.regex")
    guided_choice: list[str] | None = Field(None, description="vLLM's older form of structured_outputs.choice")
    guided_grammar: str | None = Field(None, description="vLLM's older form of structured_outputs.grammar")
    logit_bias: dict[Annotated[str, StringConstraints(pattern=r"^[0-9]+$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS,
        description="Token id (a string of digits, as in OpenAI's API) -> a bias in [-100, 100] added to that "
                    "token's logit before the penalties and sampling")
    # extras
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False,
                                      description="vLLM's (transformers' processor): a token of the prompt or output "
                                                  "has its logit divided by it if positive, multiplied if negative")
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1, description="vLLM's: tokens less likely than min_p x the most likely "
                                                      "one's probability are not sampled (0: off)")
    min_tokens: int = Field(0, ge=0, description="vLLM's: until this many tokens are out, EOS and stop_token_ids "
                                                 "cannot be sampled (at most max_tokens)")
    ignore_eos: StrictBool = False
    stop_token_ids: list[int] | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=256,
                                   description="Requests with different salts never share cached KV")
    include_stop_str_in_output: StrictBool = Field(False, description="vLLM's: keep the stop string that ended "
                                                                      "the text")
    skip_special_tokens: StrictBool = Field(True, description="vLLM's: false keeps special tokens' text")
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=1 << 17,
                                                description="vLLM's: only these tokens may be sampled")
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="vLLM's: keep only the prompt's last k tokens")
    # vLLM extras pdserve does not do: refused, not ignored
    bad_words: list[str] | None = Field(None, max_length=0, description="Not supported")
    use_beam_search: Literal[False] = Field(False, description="Not supported")
    logits_processors: list | None = Field(None, max_length=0, description="Not supported")
    priority: StrictInt = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                          description="vLLM's: lower is served first (orders admission and picks preemption victims "
                                      "on every worker; first come, first served among equals)")

    @field_validator("bad_words", "use_beam_search", "logits_processors", mode="before")
    @classmethod
    def _not_supported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported by pdserve")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    def structured_output(self) -> StructuredOutput | None:
        """The request's one output constraint (router/output_constraints.py), None: free text."""
        return one_constraint(self.response_format, self.structured_outputs, self.guided_json, self.guided_regex,
                              self.guided_choice, self.guided_grammar)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """(token id, bias) sorted by token id; "05" and "5" both name token 5 (SamplingParams refuses
        the duplicate)."""
        return tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A string or a list of token ids; or several prompts, a list of either (choice "
                         "prompt_index * n + i answers prompt prompt_index; prompts times n at most "
                         "limits.max_concurrent_requests)")
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: the prompt alone (and its logprobs)")
    echo: StrictBool = Field(False, description="Each choice's text starts with its prompt; with logprobs, so do its "
                                          "logprobs: each prompt token's logprob given the tokens before it (null "
                                          "for the first) and the top logprobs at each prompt position")
    suffix: Literal[""] | None = Field(None, description="Not supported (no fill-in-the-middle): must be empty")
    best_of: int | None = Field(None, ge=1, le=1, description="Not supported above 1 (use n)")

    @model_validator(mode="after")
    def _zero_tokens_only_with_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo: true (the prompt alone, with its logprobs)")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls (passed to the template)")
    tool_call_id: str | None = Field(None, description="A tool turn: the call it answers")
    name: str | None = None
    reasoning_content: str | None = Field(
        None, description="An assistant turn's reasoning as the answer gave it, passed back (the template decides "
                          "what to show: Qwen3's reads reasoning_content, gpt-oss's thinking, e.g. before a tool call)")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as chat templates take it: text content; a call's arguments as an object
        when they parse (templates write them with tojson), else as sent."""
        m = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                try:
                    args = json.loads(c.function.arguments)
                except ValueError:
                    args = c.function.arguments
                calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
            m["tool_calls"] = calls
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            m["name"] = self.name
        if self.reasoning_content is not None:  # Qwen3's templates read the one, gpt-oss's the other
            m["reasoning_content"] = m["thinking"] = self.reasoning_content
        return m


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatTemplateOptions(BaseModel):
    """vLLM's extras for the model's chat template: chat completions, and /tokenize of messages."""
    add_generation_prompt: StrictBool = Field(True, description="Open the assistant's turn after the messages")
    continue_final_message: StrictBool = Field(
        False, description="Let the model continue the last message (e.g. a partial assistant answer) instead of "
                           "opening a new turn; needs add_generation_prompt false")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="More variables for the chat template, e.g. {\"enable_thinking\": false} (Qwen3)")

    @model_validator(mode="after")
    def _one_turn_end(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise ValueError("continue_final_message needs add_generation_prompt: false (a message is either "
                             "continued or followed by a new assistant turn)")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(..., pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema of the arguments; none: no arguments")
    strict: StrictBool | None = Field(None, description="Accepted; a forced call's arguments always follow the schema")


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="JSON text")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionRequest(_Request, ChatTemplateOptions):
    messages: list[ChatMessage] = Field(..., min_length=1)
    chat_template: str | None = Field(None, max_length=0, description="Not supported: the model's own template is "
                                                                      "used")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128, description="Functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools: needs server.tool_call_parser), required (at least "
                          "one call, any model) or a named function (that call, any model)")
    parallel_tool_calls: StrictBool = Field(True, description="false: at most one call")
    reasoning_effort: Literal["low", "medium", "high"] | None = Field(
        None, description="For reasoning models whose chat template takes it (gpt-oss: 'Reasoning: high' in its "
                          "system message): the template's reasoning_effort; other templates ignore it")
    # OpenAI's deprecated forms of tools are refused, not answered as if there were none
    functions: list | None = Field(None, max_length=0, description="Deprecated by OpenAI: use tools")
    function_call: Literal["none"] | None = Field(None, description="Deprecated by OpenAI: use tool_choice")

    @field_validator("functions", mode="before")
    @classmethod
    def _no_functions(cls, v):
        if isinstance(v, list) and v:
            raise ValueError("the deprecated functions field is not supported: send tools")
        return v

    @field_validator("chat_template", mode="before")
    @classmethod
    def _own_template(cls, v):
        if v:
            raise ValueError("a chat template in the request is not supported: the model's own template is used")
        return v


# -- tokenizer routes (vLLM's /tokenize, /detokenize, /tokenizer_info: lm-eval-harness's remote tokenizer) --
class TokenizeRequest(ChatTemplateOptions):
    """Text, or chat messages through the model's template (with the chat extras), to token ids."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: StrictBool = Field(True, description="For prompt: the tokenizer's BOS and the like")
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- responses -------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = Field(
        None, description="With server.reasoning_parser: how many of the completion tokens were reasoning")


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token (nothing before it)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, description="With server.reasoning_parser: the model's thinking")
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pdserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


for _m in (_Request, CompletionRequest, ChatMessage, ChatCompletionRequest, Usage):
    _m.model_rebuild()
