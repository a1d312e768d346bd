"""A request's output constraint: OpenAI's response_format, vLLM's structured_outputs and its
older guided_* fields, as the request models take them, and the one StructuredOutput they mean
(workers/engine/structured_output.py enforces it)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from workers.protocol import InvalidRequestError, StructuredOutput


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="Without one: any JSON object")
    strict: StrictBool | None = Field(None, description="Accepted; the schema is always enforced")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format json_schema goes with type 'json_schema' (and only with it)")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: one constraint (unknown keys are refused: a constraint we would
    not enforce must not pass silently)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="A JSON schema (object or JSON text)")
    json_object: StrictBool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = Field(None, description="EBNF (xgrammar's dialect, GBNF-like), rule root")

    def specs(self, param: str) -> list[StructuredOutput]:
        return _constraints(self.json_, self.json_object, self.regex, self.choice, self.grammar, param)


def _constraints(schema, json_object, regex, choice, grammar, param: str) -> list[StructuredOutput]:
    """The constraints set among these (vLLM's field names; param: structured_outputs, or the
    prefix of the guided_* fields)."""
    name = (lambda f: param + f) if param.endswith("_") else (lambda f: param)
    found = []
    if schema is not None:
        found.append(StructuredOutput("json_schema", schema if isinstance(schema, str) else json.dumps(schema),
                                      name("json")))
    if json_object:
        found.append(StructuredOutput("json_object", "", name("json_object")))
    if regex is not None:
        found.append(StructuredOutput("regex", regex, name("regex")))
    if choice is not None:
        if not choice or any(not c for c in choice):
            raise InvalidRequestError("choice needs at least one non-empty string", name("choice"))
        found.append(StructuredOutput("choice", json.dumps(choice), name("choice")))
    if grammar is not None:
        found.append(StructuredOutput("grammar", grammar, name("grammar")))
    return found


def one_constraint(response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None,
                   guided_json, guided_regex, guided_choice, guided_grammar) -> StructuredOutput | None:
    """The request's one output constraint, from whichever field sent it (None: free text);
    InvalidRequestError when several are sent."""
    found = []
    rf = response_format
    if rf is not None and rf.type == "json_object":
        found.append(StructuredOutput("json_object", "", "response_format"))
    elif rf is not None and rf.type == "json_schema":
        schema = rf.json_schema.schema_
        found.append(StructuredOutput("json_schema", json.dumps(schema), "response_format") if schema is not None
                     else StructuredOutput("json_object", "", "response_format"))
    if structured_outputs is not None:
        found += structured_outputs.specs("structured_outputs")
    found += _constraints(guided_json, None, guided_regex, guided_choice, guided_grammar, "guided_")
    if len(found) > 1:
        raise InvalidRequestError(f"one structured output constraint per request; got {len(found)} ("
                                  f"{', '.join(sorted({s.param for s in found}))})", found[1].param)
    return found[0] if found else None
