"""The reasoning parser's pure parts (router/reasoning.py): a whole output split into reasoning and
answer, and the same output streamed in any pieces giving the same split; the reasoning opened by
the chat template (the prompt ends with <think>) or by the output itself."""

import random

import pytest

from router.reasoning import ReasoningStream, opened_by_prompt, split

CASES = [
    # (output, opened by the prompt) -> (reasoning, answer)
    (("<think>\nhmm, Paris\n</think>\n\nParis is the capital.", False), ("\nhmm, Paris\n", "Paris is the capital.")),
    (("Paris.", False), (None, "Paris.")),
    (("Paris.", True), ("Paris.", "")),  # opened, never closed (cut by max_tokens): all reasoning
    (("hmm</think>\n answer", True), ("hmm", "answer")),  # DeepSeek-R1: the template opened it
    (("  <think>a</think>b", False), ("a", "b")),
    (("<think>never closed", False), ("never closed", "")),
    (("no think </think> here", False), (None, "no think </think> here")),
    (("a<think>b</think>c", False), (None, "a<think>b</think>c")),
    (("<think></think>", False), ("", "")),
]


@pytest.mark.parametrize("case, want", CASES)
def test_split(case, want):
    assert split(*case) == want


@pytest.mark.parametrize("case, want", CASES)
def test_any_streamed_pieces_give_the_same_split(case, want):
    text, opened = case
    rng = random.Random(0)
    for _ in range(100):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])] or [""]
        stream, reasoning, answer = ReasoningStream(opened), "", ""
        for i, piece in enumerate(pieces):
            r, a = stream.add(piece, i == len(pieces) - 1)
            reasoning, answer = reasoning + r, answer + a
        assert (reasoning, answer) == (want[0] or "", want[1]), pieces


def test_opened_by_prompt():
    assert opened_by_prompt("<|im_start|>assistant\n<think>\n")
    assert not opened_by_prompt("<|im_start|>assistant\n") and not opened_by_prompt("<think>x</think>")


def test_a_constraint_holds_after_the_reasoning_where_the_tokenizer_has_the_markers(tiny_checkpoint):
    """marker_ids: <think> / </think> as tokens of their own, else None (the constraint then covers
    the whole output); constraint_markers: opened after a template that ends with <think>, none
    after one that closed the reasoning (thinking off), else the first token may open it."""
    from transformers import AutoTokenizer

    from router.reasoning import constraint_markers, marker_ids
    from workers.protocol import ReasoningMarkers

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))
    assert marker_ids(tokenizer) is None  # the tiny BPE splits them
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert marker_ids(tokenizer) == (start, end)
    assert constraint_markers((start, end), "<|assistant|>\n<think>\n") == ReasoningMarkers(start, end, opened=True)
    assert constraint_markers((start, end), "<|assistant|>\n") == ReasoningMarkers(start, end, opened=False)
    assert constraint_markers((start, end), "<think>\n\n</think>\n\n") is None
    assert constraint_markers(None, "<|assistant|>\n<think>\n") is None
