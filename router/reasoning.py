"""Reasoning output kept apart from the answer (server.reasoning_parser): models that think first
(Qwen3, DeepSeek-R1) write their reasoning between <think> and </think>, then the answer. Chat
answers carry the reasoning as `message.reasoning_content` (streamed: `delta.reasoning_content`)
and the answer as `content`; the Responses API as a `reasoning` output item before the message.
Tool calls are parsed from the answer only.

The reasoning starts either with the output's own <think> or, when the chat template already
opened it (the prompt ends with <think>, as DeepSeek-R1's and Qwen3's thinking templates do), at
the first token. Output with no <think> at either place is all answer; a reasoning never closed
(cut by max_tokens) is all reasoning.

A structured-output constraint (response_format, structured_outputs, a required tool call) holds
on the answer: the reasoning before it stays free (constraint_markers -> SamplingParams.reasoning;
the engine's GrammarState), where the tokenizer has <think> and </think> as tokens of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.protocol import ReasoningMarkers

# server.reasoning_parser qwen3 and deepseek_r1: both write <think> ... </think>
START, END = "<think>", "</think>"


def opened_by_prompt(prompt_text: str) -> bool:
    return prompt_text.rstrip().endswith(START)


def marker_ids(tokenizer) -> tuple[int, int] | None:
    """(<think>'s id, </think>'s id) where the tokenizer has each as a token of its own (Qwen3,
    DeepSeek-R1), else None."""
    ids = [tokenizer.encode(m, add_special_tokens=False) for m in (START, END)]
    return (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None


def constraint_markers(ids: tuple[int, int] | None, prompt_tail: str) -> ReasoningMarkers | None:
    """What a constrained request carries so that its grammar holds after the reasoning
    (SamplingParams.reasoning): None where the prompt already closed the reasoning (a template
    with thinking off ends with </think>) or the tokenizer has no marker tokens (``ids`` None:
    the constraint then covers the whole output); else the markers, opened when the prompt ends
    with <think> (otherwise the model's first token may open it)."""
    if ids is None or prompt_tail.rstrip().endswith(END):
        return None
    return ReasoningMarkers(ids[0], ids[1], opened=opened_by_prompt(prompt_tail))


def split(text: str, in_reasoning: bool) -> tuple[str | None, str]:
    """(reasoning or None, answer) of a whole output; ``in_reasoning``: the prompt opened it."""
    body = text.lstrip()
    if body.startswith(START):
        in_reasoning, text = True, body[len(START):]
    if not in_reasoning:
        return None, text
    end = text.find(END)
    if end < 0:
        return text, ""
    return text[:end], text[end + len(END):].lstrip()


def _held_back(text: str, tag: str) -> int:
    """How many trailing characters of text may be the start of tag (kept until the next delta)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


@dataclass
class ReasoningStream:
    """One streamed choice's text deltas split into (reasoning delta, answer delta), as split()
    splits the whole text."""

    in_reasoning: bool  # the prompt opened the reasoning
    state: str = "start"  # start (nothing decided yet) | reasoning | answer
    buf: str = ""  # text not sent yet
    strip_answer: bool = False  # the answer after a reasoning loses its leading whitespace, as in split()

    def add(self, text: str, final: bool) -> tuple[str, str]:
        self.buf += text
        reasoning = ""
        if self.state == "start":
            body = self.buf.lstrip()
            if body.startswith(START):
                self.state, self.buf = "reasoning", body[len(START):]
            elif START.startswith(body) and not final:
                return "", ""  # whitespace, or the start of "<think>": not decided yet
            else:
                self.state = "reasoning" if self.in_reasoning else "answer"
        if self.state == "reasoning":
            end = self.buf.find(END)
            if end < 0:
                cut = len(self.buf) - (0 if final else _held_back(self.buf, END))
                reasoning, self.buf = self.buf[:cut], self.buf[cut:]
                return reasoning, ""
            reasoning, self.buf, self.state, self.strip_answer = self.buf[:end], self.buf[end + len(END):], "answer", True
        if self.strip_answer:
            self.buf = self.buf.lstrip()
            self.strip_answer = not self.buf
        answer, self.buf = self.buf, ""
        return reasoning, answer
