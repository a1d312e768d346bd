"""The incremental detokenizer: its DecodeStream path (Rust tokenizers) gives, token by token, the
same text as its window decode through ``tokenizer.decode``, stop strings included; the real
tokenizers of the tests' tiny models (byte-level BPE: random ids split UTF-8 characters) and of the
default model (SentencePiece-style, when it is cached)."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from workers.engine.detokenizer import Detokenizer
from workers.model_files import default_model_dir


class WindowOnly:
    """The same tokenizer without its Rust backend attribute: the Detokenizer's window decode."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def _tokenizers(tiny_checkpoint):
    toks = [AutoTokenizer.from_pretrained(tiny_checkpoint("llama"))]
    if (default_model_dir() / "tokenizer.json").exists():
        toks.append(AutoTokenizer.from_pretrained(default_model_dir()))
    return toks


def _run(tokenizer, ids: list[int], prompt_tail: list[int], stop: tuple[str, ...], final_at: int):
    d = Detokenizer(tokenizer, stop, prompt_tail)
    deltas = []
    for i, t in enumerate(ids[:final_at]):
        final = i == final_at - 1
        d.add([t], final=final)
        deltas.append(d.take_delta(final=final or d.stopped))
        if d.stopped:
            break
    return deltas, d.stopped


def test_stream_path_matches_window_decode(tiny_checkpoint):
    rng = random.Random(0)
    for tok in _tokenizers(tiny_checkpoint):
        d = Detokenizer(tok)
        assert d._stream is not None, "the fast tokenizer should take the DecodeStream path"
        vocab = len(tok)
        text = "The capital of France is Paris. Ünïcödé → 東京 ok"
        natural = tok(text, add_special_tokens=False)["input_ids"]
        cases = [(natural, natural[:3])] + [
            ([rng.randrange(vocab) for _ in range(40)], [rng.randrange(vocab) for _ in range(6)]) for _ in range(30)]
        for ids, tail in cases:
            for stop in ((), ("is",), ("e P", "xx")):
                fast = _run(tok, ids, tail, stop, len(ids))
                slow = _run(WindowOnly(tok), ids, tail, stop, len(ids))
                assert fast == slow, (ids, tail, stop)
        # unstopped, the pieces add up to the text of the whole output
        pieces, _ = _run(tok, natural, [], (), len(natural))
        assert "".join(pieces) == tok.decode(natural, skip_special_tokens=True)


def test_final_flush_of_an_incomplete_character(tiny_checkpoint):
    tok = _tokenizers(tiny_checkpoint)[0]
    ids = tok("東京", add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        pytest.fail(f"the tiny tokenizer should split a CJK character into bytes, got {ids}")
    cut = ids[:-1]  # ends inside a character: the last piece is U+FFFD, as a full decode gives it
    fast, _ = _run(tok, cut, [], (), len(cut))
    slow, _ = _run(WindowOnly(tok), cut, [], (), len(cut))
    assert fast == slow
    assert "".join(fast) == tok.decode(cut, skip_special_tokens=True)


def test_include_stop_and_special_tokens(tiny_checkpoint):
    """vLLM's include_stop_str_in_output keeps the stop string that ended the text; with
    skip_special_tokens false a special token's text stays (both decode paths)."""
    for tok in _tokenizers(tiny_checkpoint):
        ids = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
        for t in (tok, WindowOnly(tok)):
            d = Detokenizer(t, ("France",), include_stop=True)
            d.add(ids)
            assert d.stopped and d.take_delta(final=True) == "The capital of France"
            d = Detokenizer(t, ("France",))
            d.add(ids)
            assert d.take_delta(final=True) == "The capital of "
        special = tok.convert_tokens_to_ids(tok.eos_token)
        for skip, want in ((True, "Paris."), (False, "Paris." + tok.eos_token)):
            for t in (tok, WindowOnly(tok)):
                d = Detokenizer(t, skip_special_tokens=skip)
                d.add(tok("Paris.", add_special_tokens=False)["input_ids"] + [special])
                assert d.take_delta(final=True) == want, (skip, type(t))


def test_stop_strings_against_the_whole_text(tiny_checkpoint):
    """Token by token, with stop strings (both decode paths): the pieces add up to the whole
    output's text cut at the stop string that completes first (kept with include_stop), no piece
    hands out a stop string's start before it is known not to be one, and a stream without a
    match gives the whole text."""
    for tok in _tokenizers(tiny_checkpoint):
        ids = tok("The capital of France is Paris. Ünïcödé → 東京 ok. The end.", add_special_tokens=False)["input_ids"]
        whole = tok.decode(ids, skip_special_tokens=True)
        for stop in (("Paris",), ("is P", "zzz"), ("東",), ("zzz",), ("ok.", "capital"), ("end.",), ("T",)):
            hits = [(whole.find(s) + len(s), whole.find(s), s) for s in stop if s in whole]
            for include in (False, True):
                for t in (tok, WindowOnly(tok)):
                    d = Detokenizer(t, stop, include_stop=include)
                    pieces = []
                    for i, token in enumerate(ids):
                        final = i == len(ids) - 1
                        d.add([token], final=final)
                        pieces.append(d.take_delta(final=final or d.stopped))
                        so_far = "".join(pieces)
                        if not d.stopped and not final:  # nothing that may still begin a stop string
                            assert not any(s in so_far for s in stop), (stop, so_far)
                        if d.stopped:
                            break
                    want = whole
                    if hits:
                        _, start, s = min(hits)
                        want = whole[:start + len(s) if include else start]
                    assert d.stopped == bool(hits)
                    assert "".join(pieces) == want, (stop, include, type(t))
