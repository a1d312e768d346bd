"""The OpenAI-compatible endpoint: a Ray Serve deployment with a FastAPI app.

    POST /v1/completions, /v1/chat/completions (SSE streaming with usage), GET /v1/models
    POST /v1/responses (OpenAI's Responses API, stateless, on the chat path)
    POST /tokenize, /detokenize, GET /tokenizer_info (vLLM's; lm-eval-harness's remote tokenizer)
    GET /health (process up), /ready (503 until the minimum workers are registered), /metrics
    GET /v1/routing/recent (this endpoint's workers with their KV use, recent routing decisions)

Limits (config `limits:`): body size (413), prompt tokens and max_tokens (400), concurrent requests
(429 with Retry-After), and the request deadline (504). Every error body is OpenAI-shaped.

``build_app`` is the Ray Serve application builder (RayService serveConfigV2 import path
``router.app:build_app``); ``pdserve up`` uses it too.
"""

import asyncio
import dataclasses
import logging
import sys
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import Info, generate_latest
from ray import serve

from cluster.config import PdserveConfig, load_config, parse_config
from router import fanout
from router import openai_format as fmt
from router.cluster_view import ClusterView
from router.endpoint_errors import ERROR_RESPONSES, UNAVAILABLE, first_delta, install_error_handlers, stream_error
from router.harmony import Harmony
from router.metrics import EndpointMetrics
from router.openai_models import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                  CompletionResponse, DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelCard,
                                  ModelList, TokenizeRequest, TokenizeResponse)
from router.request_flow import RequestTimedOut, serve_request
from router.request_parsing import chat_prompt, check_token_ids, completion_prompts, sampling_params, truncated
from router.reasoning import constraint_markers, marker_ids, opened_by_prompt
from router.responses_api import ResponseBuilder, ResponsesRequest, event_stream
from router.tool_calls import ToolPlan
from router.http_errors import ApiKeyAuth, BodyLimit, HTTPError, error_response
from workers.protocol import IngressSnapshot, SamplingParams

app = FastAPI(title="pdserve OpenAI-compatible API", version="0.1.0")
# stream: true answers with server-sent events instead of the JSON body; the schema describes one
# event: its data is a JSON chunk (or {"error": ...}), and the last one is [DONE]
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk, an error object, or [DONE]"}}}}}

install_error_handlers(app)
app.add_middleware(BodyLimit)
app.add_middleware(ApiKeyAuth)  # added last: runs first, so a request without a key never sends its body


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, config: "PdserveConfig"):
        from transformers import AutoTokenizer

        from workers.model_files import resolve_model_path, served_model_name

        logging.basicConfig(level=logging.INFO)
        from workers.worker_base import GIL_SWITCH_INTERVAL_S

        # this replica's process runs Serve's request loop and our user-code loop on two threads
        # (plus Ray's callbacks): each hand-off of a delta waits for the GIL, as in a worker
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.config = config
        model_path = resolve_model_path(self.config.model.path, weights=False)  # its tokenizer and config
        self.model_name = served_model_name(model_path, self.config.model.served_model_name,
                                            requested=self.config.model.path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._think_ids = marker_ids(self.tokenizer)  # <think>, </think> as tokens, or None
        self._harmony = Harmony.of(self.tokenizer) if self.config.server.harmony else None
        from workers.engine.model_runner import load_hf_config

        text_config = load_hf_config(model_path).get_text_config()
        self.max_model_len = self.config.engine.max_model_len or getattr(text_config, "max_position_embeddings", 2048)
        self.view: ClusterView | None = None
        self._starting: asyncio.Lock | None = None
        self.num_inflight = 0
        self.created = int(time.time())
        self.metrics = EndpointMetrics(lambda: self.view)
        # GET /metrics answers for whichever replica Serve picks: it says which app and replica, so
        # the manager can find the app and ask every replica (snapshot(); cluster/ingress_replicas.py)
        self.replica_id = serve.get_replica_context().replica_id
        Info("pdserve_endpoint", "The Serve app and replica whose counts this scrape shows",
             registry=self.metrics.registry).info({"app": self.replica_id.deployment_id.app_name,
                                                   "replica": self.replica_id.unique_id})
        self.vocab_size = text_config.vocab_size
        app.state.max_body_bytes = self.config.limits.max_body_bytes  # read by BodyLimit
        app.state.api_keys = [k.get_secret_value().encode() for k in self.config.server.api_keys]  # ApiKeyAuth

    async def _view(self) -> ClusterView:
        if self.view is None:
            self._starting = self._starting or asyncio.Lock()
            async with self._starting:
                if self.view is None:
                    view = ClusterView(self.config.cluster_name, self.config.etcd, self.config.router,
                                       self.config.engine.block_size)
                    await view.start()
                    self.view = view
        return self.view

    # -- probes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready(self):
        ready, reason = (await self._view()).is_ready()
        if not ready:
            return error_response(503, reason, "service_unavailable", code="not_ready")
        return {"status": "ready"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(self):
        await self._view()
        return PlainTextResponse(generate_latest(self.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    async def snapshot(self) -> IngressSnapshot:
        """This replica's own counts and routing (not an HTTP route: the manager broadcasts it)."""
        view = await self._view()
        return IngressSnapshot(replica_id=self.replica_id.unique_id,
                               metrics_text=generate_latest(self.metrics.registry).decode(),
                               decisions=tuple(view.decisions), zero_overlap_alarm=view.alarm.is_alarmed,
                               num_inflight=self.num_inflight)

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[await self.model(self.model_name)])

    # -- tokenizer (vLLM's routes; lm-eval-harness uses them as its remote tokenizer) -----------
    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
    async def model(self, model: str) -> ModelCard:
        """OpenAI's model retrieval (the served name may hold a '/', as hub ids do)."""
        self._check_model(model)
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_model_len)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """The ids the endpoint would run for this prompt (completions) or these messages (chat)."""
        if body.model is not None:
            self._check_model(body.model)
        if body.messages is not None:
            ids = chat_prompt(self.tokenizer, body)
        else:
            ids = list(self.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            self._check_model(body.model)
        check_token_ids(body.tokens, self.vocab_size, "token ids", "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    @app.get("/tokenizer_info")
    async def tokenizer_info(self) -> dict:
        """The served tokenizer's special tokens, chat template and limits."""
        tok = self.tokenizer
        special = {name: (str(getattr(tok, name)) if getattr(tok, name, None) is not None else None)
                   for name in ("eos_token", "bos_token", "pad_token", "unk_token")}
        return {"tokenizer_class": type(tok).__name__, **special, "model_max_length": self.max_model_len,
                "vocab_size": self.vocab_size, "chat_template": getattr(tok, "chat_template", None)}

    @app.get("/v1/routing/recent")
    async def recent_routing(self) -> dict:
        """This endpoint's view: the workers it routes to and its recent routing decisions."""
        view = await self._view()
        workers = {wid: {"role": w.info.role.value, "healthy": w.is_healthy,
                         "draining": bool(w.state and w.state.load.is_draining),
                         "used_blocks": w.state.load.num_used_blocks if w.state else None,
                         "pinned_blocks": w.state.load.num_pinned_blocks if w.state else None,
                         "total_blocks": w.state.load.num_total_blocks if w.state else None,
                         # this router's estimate (ClusterView: its own requests not yet past their
                         # first token, + what the worker reports beyond them)
                         "pending_prefill_tokens": w.load().num_pending_prefill_tokens if w.state else None,
                         "prefills_in_flight": len(w.prefill_in_flight),
                         # as of its last answer: seconds its engine had made no progress
                         "engine_stalled_s": w.state.load.engine_stalled_s if w.state else None}
                   for wid, w in list(view.workers.items())}
        return {"workers": workers, "decisions": list(view.decisions), "zero_overlap_alarm": view.alarm.is_alarmed,
                "etcd_connected": view.watcher.is_connected, "etcd_resyncs": view.watcher.num_resyncs,
                "inflight_requests": self.num_inflight}

    # -- generation ----------------------------------------------------------------------------
    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**ERROR_RESPONSES, 200: {"content": _SSE}})
    async def completions(self, body: CompletionRequest):
        self._check_model(body.model)
        items = completion_prompts(self.tokenizer, body, self.vocab_size)
        subs = self._fanout(body.n, [(ids, sampling_params(body, len(ids), self.max_model_len, self.config.limits,
                                                           default_max_tokens=16)) for ids, _ in items])
        echoes = [fmt.Echo(ids, text if text is not None else self.tokenizer.decode(ids))
                  for ids, text in items] if body.echo else None
        hide = body.echo and body.max_tokens == 0  # the one token run is left out
        rid = f"cmpl-{uuid.uuid4().hex}"
        want_lp = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            started: set[int] = set()

            def chunk(d, acc, created, offset, index):
                first = index not in started
                started.add(index)
                return [fmt.completion_chunk(rid, self.model_name, created, d, acc, want_lp, offset, index,
                                             echoes[index // body.n] if echoes else None, first)]

            return await self._stream(rid, subs, body.n, body.cache_salt, include_usage, chunk, "text_completion",
                                      chat=False, hide_output=hide)
        accs = await self._collect(rid, subs, body.cache_salt, hide_output=hide)
        return fmt.completion_body(rid, self.model_name, accs, want_lp, body.n, echoes)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**ERROR_RESPONSES, 200: {"content": _SSE}})
    async def chat_completions(self, body: ChatCompletionRequest):
        self._check_model(body.model)
        tools, prompt, sampling, reasoning = self._chat_request(body)
        subs = self._fanout(body.n, [(prompt, sampling)])
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            streams = [fmt.AnswerStream(tools, reasoning) for _ in subs]

            def chunk(d, acc, created, offset, index):
                lp = fmt.chat_logprobs(acc, list(d.token_ids), list(d.logprobs or ()), d.top_logprobs) \
                    if body.logprobs and d.token_ids else None
                thought, deltas, finish = streams[index].add(d.text, fmt.finish_str(d.finish_reason))
                if reasoning is not None:
                    acc.add_reasoning(thought)
                if thought:
                    deltas = [{"reasoning_content": thought}] + [x for x in deltas if x != {"content": ""}]
                if not deltas and (lp or finish):
                    deltas = [{}]
                return [fmt.chat_chunk(rid, self.model_name, created, delta, finish if j == len(deltas) - 1 else None,
                                       lp if j == 0 else None, index) for j, delta in enumerate(deltas)]

            return await self._stream(rid, subs, body.n, body.cache_salt, include_usage, chunk,
                                      "chat.completion.chunk", chat=True)
        accs = await self._collect(rid, subs, body.cache_salt)
        return fmt.chat_body(rid, self.model_name, accs, body.logprobs, tools, reasoning)

    @app.post("/v1/responses", responses={**ERROR_RESPONSES, 200: {"content": _SSE}})
    async def responses(self, body: ResponsesRequest):
        """OpenAI's Responses API, stateless, on the chat path (router/responses_api.py)."""
        self._check_model(body.model)
        tools, prompt, sampling, reasoning = self._chat_request(body.to_chat())
        (sub,) = self._fanout(1, [(prompt, sampling)])
        rid = f"resp_{uuid.uuid4().hex}"
        builder = ResponseBuilder(rid, self.model_name, body, tools, reasoning)
        if not body.stream:
            (acc,) = await self._collect(rid, [sub], None)
            return builder.finished(acc)
        view = await self._admit()
        deltas = self._deltas(view, rid, *sub, None)
        first = await first_delta(deltas)
        events = event_stream(builder, fmt.Accumulator(self.tokenizer), first, deltas, lambda e: stream_error(rid, e))
        return StreamingResponse(events, media_type="text/event-stream")

    # -- internals -----------------------------------------------------------------------------
    def _chat_request(self, body: ChatCompletionRequest) -> tuple[ToolPlan, list[int], SamplingParams,
                                                                  bool | Harmony | None]:
        """A chat request's tool plan, prompt ids (the template's, tools included), sampling, and
        whether the template opened the model's reasoning (None without server.reasoning_parser;
        router/reasoning.py), or the Harmony parser's settings for gpt-oss (router/harmony.py).
        With a <think> parser a constraint holds after the reasoning; with harmony it holds from
        the first token (the output is then plain text, no channels)."""
        server = self.config.server
        tools = ToolPlan.of(body, "gpt_oss" if server.harmony else server.tool_call_parser)
        prompt = truncated(chat_prompt(self.tokenizer, body, tools.template_tools), body)
        sampling = sampling_params(body, len(prompt), self.max_model_len, self.config.limits,
                                   default_max_tokens=None, tool_constraint=tools.constraint)
        if server.harmony:  # the channels are special tokens: the parser needs their text
            return tools, prompt, dataclasses.replace(sampling, skip_special_tokens=False), self._harmony
        if server.reasoning_parser is None:
            return tools, prompt, sampling, None
        tail = self.tokenizer.decode(prompt[-8:])
        markers = constraint_markers(self._think_ids, tail) if sampling.structured is not None else None
        if markers is not None:  # the grammar holds on the answer, after the reasoning
            sampling = dataclasses.replace(sampling, reasoning=markers)
        return tools, prompt, sampling, opened_by_prompt(tail)

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise HTTPError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                            "invalid_request_error", "model", "model_not_found")

    def _fanout(self, n: int, prompts: list[tuple[list[int], SamplingParams]]):
        """fanout.choices with this model's vocabulary and limit."""
        return fanout.choices(n, prompts, self.vocab_size, self.config.limits.max_concurrent_requests)

    @staticmethod
    def _sub_id(rid: str, index: int, n: int) -> str:
        return rid if n == 1 else f"{rid}-{index}"

    async def _admit(self, n: int = 1) -> ClusterView:
        view = await self._view()
        ready, reason = view.is_ready()
        if not ready:
            raise HTTPError(503, f"the cluster is not ready: {reason}", "service_unavailable", code="not_ready")
        if self.num_inflight + n > self.config.limits.max_concurrent_requests:
            self.metrics.requests.labels("rejected").inc()
            raise HTTPError(429, f"too many concurrent requests (limit {self.config.limits.max_concurrent_requests})",
                            "rate_limit_exceeded", code="too_many_requests",
                            headers={"Retry-After": str(self.config.limits.retry_after_s)})
        return view

    async def _deltas(self, view, rid, prompt, sampling, salt, hide_output: bool = False):
        """serve_request with metrics and status accounting; ``hide_output``: the deltas without
        their output tokens (fmt.without_output), which the metrics still count."""
        self.num_inflight += 1
        self.metrics.queue_depth.set(self.num_inflight)
        start, last, status = time.monotonic(), None, "error"

        def on_event(kind, what):
            if kind == "routed":
                self.metrics.routed.labels(what.decode.worker_id, what.reason).inc()
                if what.ttft is not None and what.ttft.remote_because is not None:
                    self.metrics.ttft_remote.labels(what.ttft.remote_because).inc()
            elif kind == "migrated":
                self.metrics.migrations.inc()

        try:
            async for d in serve_request(view, rid, prompt, sampling, salt, self.config.limits, self.tokenizer,
                                         on_event=on_event):
                now = time.monotonic()
                if d.token_ids:
                    if last is None:
                        self.metrics.ttft.observe(now - start)
                    else:
                        for _ in d.token_ids:
                            self.metrics.itl.observe((now - last) / len(d.token_ids))
                    last = now
                    self.metrics.completion_tokens.inc(len(d.token_ids))
                if d.finished:
                    status = "ok" if d.error is None else "error"
                    self.metrics.prompt_tokens.inc(d.num_prompt_tokens or len(prompt))
                yield fmt.without_output(d) if hide_output else d
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            self.num_inflight -= 1
            self.metrics.queue_depth.set(self.num_inflight)
            self.metrics.requests.labels(status).inc()
            self.metrics.e2e.observe(time.monotonic() - start)

    async def _collect(self, rid, subs, salt, hide_output: bool = False) -> list[fmt.Accumulator]:
        """Every choice to its end (the choices run side by side; one failing cancels the rest).
        ``hide_output``: their output tokens are left out (echo with max_tokens 0)."""
        view = await self._admit(len(subs))
        accs = [fmt.Accumulator(self.tokenizer) for _ in subs]

        async def one(i: int) -> None:
            prompt, sampling = subs[i]
            async for d in self._deltas(view, self._sub_id(rid, i, len(subs)), prompt, sampling, salt, hide_output):
                accs[i].add(d)
                if d.error:
                    raise HTTPError(503, f"request failed: {d.error}", "server_error", code="request_failed")

        try:
            await fanout.run_all([one(i) for i in range(len(subs))])
        except UNAVAILABLE as e:
            raise HTTPError(503, str(e), "service_unavailable", code="no_worker") from e
        except RequestTimedOut as e:
            raise HTTPError(504, str(e), "timeout_error", code="request_timeout") from e
        return accs

    async def _stream(self, rid, subs, per_prompt, salt, include_usage, make_chunk, obj, chat: bool,
                      hide_output: bool = False):
        view = await self._admit(len(subs))
        created = int(time.time())
        n = len(subs)
        accs = [fmt.Accumulator(self.tokenizer) for _ in subs]
        deltas = fanout.merge([self._deltas(view, self._sub_id(rid, i, n), p, s, salt, hide_output)
                               for i, (p, s) in enumerate(subs)])
        first = await first_delta(deltas)
        events = fmt.chunk_events(rid, self.model_name, created, chat, first, deltas, accs, make_chunk,
                                  obj if include_usage else None, per_prompt, lambda e: stream_error(rid, e))
        return StreamingResponse(events, media_type="text/event-stream")


def build_app(args: dict | None = None):
    """Ray Serve application builder. args: {"config_path": FILE} or {"config": {...}}, plus
    optional dotted overrides under "overrides"."""
    args = args or {}
    if "config" in args:
        config = parse_config(args["config"])
    else:
        config = load_config(args.get("config_path"), args.get("overrides"))
    from cluster.manager import ensure_manager

    ensure_manager(config)
    limits = config.limits
    return OpenAIIngress.options(
        num_replicas=config.server.ingress_replicas, ray_actor_options={"num_cpus": config.server.ingress_num_cpus},
        max_ongoing_requests=limits.max_concurrent_requests * 2,  # above ours: we answer 429, Serve never queues
    ).bind(config)
