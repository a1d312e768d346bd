"""Incremental detokenization with stop strings, one instance per request.

Text is decoded from a sliding window of token ids so that multi-token characters (UTF-8 pieces,
SentencePiece spaces) come out whole; text that could still become a stop string is held back
until it cannot.

With a Rust (``tokenizers``) backend the window is the library's ``DecodeStream``: one native call
per token where the window decode takes two ``tokenizer.decode`` calls through transformers'
Python layers (~20 µs a token on the CI box: at batch 32 that was the largest host cost of a
decode step after the forward, benchmarks/host_profile.py). Both give the text of a full decode;
the window decode stays for other tokenizers and for the final flush of an incomplete character.
"""

from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21: the window decode only
    DecodeStream = None


def _decode_stream(prefill: list[int], skip_special_tokens: bool = True):
    """A DecodeStream primed with the prompt tail (tokenizers >= 0.22 take ids); None before that."""
    try:
        return DecodeStream(list(prefill), skip_special_tokens)
    except TypeError:
        return None


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), prompt_tail: list[int] | None = None,
                 include_stop: bool = False, skip_special_tokens: bool = True):
        """``include_stop``: the text keeps the stop string that ended it (vLLM's
        include_stop_str_in_output); ``skip_special_tokens`` False: special tokens' text is kept."""
        self.tokenizer = tokenizer
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self._holdback = max((len(s) for s in stop), default=1) - 1
        # Start the window on a few prompt tokens so the first output token decodes with its
        # leading space exactly as it does in the full text.
        self._ids: list[int] = list(prompt_tail or [])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # output text not handed out yet (take_delta): with stop strings, at least the last
        # holdback characters (a possible stop string's start); truncated at a stop string once found.
        # Only this tail is kept, so each token appends to a short string, not the whole output's
        self._pending = ""
        self.stopped = False  # a stop string was found
        self._rust = getattr(tokenizer, "_tokenizer", None) if DecodeStream is not None else None
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._rust = None  # transformers' decode edits spaces the Rust decode keeps
        if self._rust is not None and self._ids and tokenizer.decode(self._ids).endswith("\ufffd"):
            self._rust = None  # DecodeStream re-emits a prompt tail that ends inside a character
        self._stream = _decode_stream(self._ids, skip_special_tokens) if self._rust is not None else None
        self._rust = self._rust if self._stream is not None else None

    def add(self, token_ids: list[int], final: bool = False) -> None:
        """Append tokens; detects stop strings. ``final``: no more tokens will come, so text that
        is still an incomplete character is emitted as it decodes (U+FFFD), like a full decode."""
        if self.stopped:
            return
        if self._stream is not None:
            for t in token_ids:
                self._ids.append(t)
                new = self._stream.step(self._rust, t)
                if new:  # the window advances as in the decode below: it starts at the last read
                    self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                    self._append_text(new)
                    if self.stopped:
                        return
            if not (final and self._read_offset < len(self._ids)):
                return
            token_ids = []  # the final flush of an incomplete character: the window decode
        self._ids.extend(token_ids)
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
        full = decode(self._ids[self._prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            new = full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._append_text(new)

    def _append_text(self, new: str) -> None:
        # a stop string can start no earlier than holdback characters before the new text, all of
        # them still pending (take_delta keeps them back)
        start = max(0, len(self._pending) - self._holdback)
        self._pending += new
        for s in self.stop:
            i = self._pending.find(s, start)
            if i >= 0:
                self._pending = self._pending[:i + len(s) if self.include_stop else i]
                self.stopped = True
                break

    def take_delta(self, final: bool) -> str:
        """Text not yet handed out; keeps back a possible stop-string prefix unless final."""
        if final and not self.stopped and self._read_offset < len(self._ids):
            self.add([], final=True)
        if final or self.stopped or not self.stop:
            delta, self._pending = self._pending, ""
            return delta
        cut = len(self._pending) - self._holdback
        if cut <= 0:
            return ""
        delta, self._pending = self._pending[:cut], self._pending[cut:]
        return delta


def request_detokenizer(tokenizer, sampling, prompt_token_ids) -> Detokenizer:
    """A request's detokenizer: its stop strings and text options, started on its prompt's tail
    (the engine's, and the router's for a migrated request: the same text either way)."""
    return Detokenizer(tokenizer, sampling.stop, list(prompt_token_ids[-6:]), sampling.include_stop_str_in_output,
                       sampling.skip_special_tokens)
