"""StreamRecorder: one streamed completion read on its own thread, every chunk kept, so a test can
act (kill, freeze) while the stream is running and then check what the client saw."""

from __future__ import annotations

import threading
import time


class StreamRecorder(threading.Thread):
    def __init__(self, client, model: str, prompt: str, max_tokens: int, **params):
        super().__init__(daemon=True)
        self.client, self.model, self.prompt, self.max_tokens, self.params = client, model, prompt, max_tokens, params
        self.text = ""
        self.tokens: list[str] = []  # one entry per generated token (from logprobs; with echo, the prompt's first)
        self.logprobs: list[float | None] = []  # each token's logprob, as the chunks carried them
        self.finish_reason: str | None = None
        self.usage = None
        self.error: Exception | None = None
        self.num_chunks = 0

    def run(self) -> None:
        try:
            params = dict(self.params)
            extra_body = {"ignore_eos": True} | params.pop("extra_body", {})
            stream = self.client.completions.create(
                model=self.model, prompt=self.prompt, max_tokens=self.max_tokens, stream=True, logprobs=0,
                stream_options={"include_usage": True}, extra_body=extra_body, **params)
            for chunk in stream:
                self.num_chunks += 1
                if chunk.usage is not None:
                    self.usage = chunk.usage
                for choice in chunk.choices:
                    self.text += choice.text
                    if choice.logprobs is not None:
                        self.tokens += choice.logprobs.tokens
                        self.logprobs += choice.logprobs.token_logprobs
                    self.finish_reason = choice.finish_reason or self.finish_reason
        except Exception as e:  # kept for the test to inspect
            self.error = e

    def wait_tokens(self, n: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.tokens) < n:
            if self.error is not None or not self.is_alive():
                raise AssertionError(f"the stream ended after {len(self.tokens)} tokens (error: {self.error!r})")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.tokens)} of {n} tokens within {timeout_s:.0f} s")
            time.sleep(0.02)

    def result(self, timeout_s: float = 180) -> "StreamRecorder":
        self.join(timeout_s)
        if self.is_alive():
            raise AssertionError(f"the stream did not end within {timeout_s:.0f} s")
        return self
