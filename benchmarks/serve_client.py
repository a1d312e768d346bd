"""The open-loop load generator: sends each BenchRequest at its arrival time, whatever the server's
state (requests never wait for earlier ones), over streaming /v1/completions, and times every token.

Per request: TTFT (send -> first token chunk), the gaps between token chunks (a chunk carrying k
tokens counts k gaps of gap/k, as the endpoint's own ITL histogram does), e2e (send -> last
chunk), output tokens (from the chunks' logprobs token lists, checked against the final usage).
``lateness_s`` says how far behind schedule the client sent it: a load generator that falls
behind would under-load the server, so the summary reports the worst lateness.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field

import httpx

from benchmarks.serve_workloads import BenchRequest


@dataclass
class RequestResult:
    index: int
    scheduled_s: float
    sent_s: float = 0.0  # relative to the run's start
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    finished_s: float | None = None  # relative to the run's start
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)

    @property
    def lateness_s(self) -> float:
        return max(0.0, self.sent_s - self.scheduled_s)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (DistServe's TPOT)."""
        if self.ttft_s is None or self.e2e_s is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_output_tokens - 1)


async def _one(client: httpx.AsyncClient, model: str, req: BenchRequest, salt: str, t0: float,
               timeout_s: float) -> RequestResult:
    res = RequestResult(req.index, req.arrival_s)
    delay = t0 + req.arrival_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {"model": model, "prompt": list(req.prompt_token_ids), "max_tokens": req.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0, "logprobs": 0,
            "cache_salt": salt}
    start = time.monotonic()
    res.sent_s = start - t0
    last = None
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.monotonic()
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        res.error = f"stream error: {chunk['error'].get('message')}"
                        return res
                    if chunk.get("usage"):
                        u = chunk["usage"]
                        res.num_prompt_tokens = u["prompt_tokens"]
                        res.num_cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                        if u["completion_tokens"] != res.num_output_tokens:
                            res.error = (f"usage says {u['completion_tokens']} tokens, the stream carried "
                                         f"{res.num_output_tokens}")
                            return res
                    for choice in chunk.get("choices") or ():
                        k = len((choice.get("logprobs") or {}).get("tokens") or ())
                        if k == 0:
                            continue
                        if last is None:
                            res.ttft_s = now - start
                        else:
                            res.itl_s += [(now - last) / k] * k
                        last = now
                        res.num_output_tokens += k
    except TimeoutError:
        res.error = f"no answer within {timeout_s:g} s"
        return res
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    if last is None:
        res.error = "the stream carried no token"
        return res
    res.e2e_s = last - start
    res.finished_s = last - t0
    res.ok = res.num_output_tokens == req.max_tokens
    if not res.ok:
        res.error = f"{res.num_output_tokens} tokens, asked for {req.max_tokens}"
    return res


def _auth() -> dict[str, str]:
    """The endpoint's API key (server.api_keys) from env PDSERVE_API_KEY (its first key), if set."""
    key = os.environ.get("PDSERVE_API_KEY", "").split(",")[0].strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


async def run_load(url: str, model: str, requests: list[BenchRequest], salt: str,
                   timeout_s: float = 300.0) -> list[RequestResult]:
    """Send every request at its arrival time; returns their results in request order.
    ``salt`` (a cache_salt) keeps this run's prefix-cache hits to its own requests."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout_s, connect=30), limits=limits,
                                 headers=_auth()) as client:
        t0 = time.monotonic() + 0.05  # every task is created before the first send
        return list(await asyncio.gather(*(_one(client, model, r, salt, t0, timeout_s) for r in requests)))


async def model_id(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=_auth()) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]


# what went wrong (or was worked around) inside the cluster during a run: the workers' counters
# (summed over workers) and this endpoint replica's migrations, from GET /metrics
EVENT_COUNTERS = {"pdserve_transfers_total": "kv_transfers", "pdserve_preemptions_total": "preemptions",
                  "pdserve_prefill_fallbacks_total": "prefill_fallbacks",
                  "pdserve_prefill_retries_total": "prefill_retries",
                  "pdserve_kv_leases_expired_total": "leases_expired",
                  "pdserve_transfer_failures_total": "transfer_failures",
                  "pdserve_local_prefills_total": "local_prefills", "pdserve_migrations_total": "migrations",
                  "pdserve_import_waits_total": "import_waits",
                  "pdserve_compiles_while_serving_total": "compiles_while_serving",
                  "pdserve_compile_seconds_while_serving_total": "compile_seconds_while_serving",
                  # a gauge: referenced KV blocks; once a run is over and idle, anything here is a leak
                  "pdserve_kv_used_blocks": "kv_blocks_in_use"}
# the endpoint's own latency sums (seconds) and counts: the router's TTFT, from the request reaching its
# replica to the first token leaving it (the client's TTFT adds the HTTP proxy and the client)
SUMMED = {"pdserve_ttft_seconds_sum": "router_ttft_sum_s", "pdserve_ttft_seconds_count": "router_ttft_count"}
# counted by one label: routed_<reason> (the router's decisions), ttft_remote_<why> (why the ttft
# rule did not keep a prompt on its decode worker)
LABELLED_COUNTERS = {"pdserve_routing_decisions_total": ("reason", "routed_"),
                     "pdserve_ttft_remote_prefills_total": ("why", "ttft_remote_"),
                     # routing -> first token at the router, by path (summed seconds, count)
                     "pdserve_routed_prefill_seconds_total": ("path", "pending_s_"),
                     "pdserve_routed_prefills_total": ("path", "pending_n_")}


async def cluster_events(url: str) -> dict[str, float]:
    """EVENT_COUNTERS' current totals (Prometheus text format, one sample per worker), and
    LABELLED_COUNTERS' by their label's value (only those seen)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.get("/metrics")
        r.raise_for_status()
    out = dict.fromkeys(EVENT_COUNTERS.values(), 0.0)
    for line in r.text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = EVENT_COUNTERS.get(name) or SUMMED.get(name)
        if name in LABELLED_COUNTERS:
            label, prefix = LABELLED_COUNTERS[name]
            value = re.search(label + r'="([^"]*)"', line)
            key = prefix + value.group(1) if value else None
        if key is not None:
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out
