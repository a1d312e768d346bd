"""The endpoint's Prometheus metrics: request latencies measured here, plus per-worker KV use,
transfer and prefix-cache counters read from the ClusterView at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class EndpointMetrics:
    def __init__(self, view_getter):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pdserve_requests", "Requests by final status", ["status"], registry=r)
        self.ttft = Histogram("pdserve_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve_itl_seconds", "Inter-token latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_seconds", "End-to-end request latency", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("pdserve_queue_depth", "Requests in flight at this endpoint", registry=r)
        self.routed = Counter("pdserve_routing_decisions", "Routing decisions", ["decode_worker", "reason"], registry=r)
        self.ttft_remote = Counter("pdserve_ttft_remote_prefills", "Prompts the ttft rule sent to a prefill worker, by "
                                   "why not local: over_cap, short_of_blocks, slower", ["why"], registry=r)
        self.migrations = Counter("pdserve_migrations", "Requests migrated after a decode worker failed", registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens served", registry=r)
        self.completion_tokens = Counter("pdserve_completion_tokens", "Completion tokens served", registry=r)
        r.register(_ClusterCollector(view_getter))


class _ClusterCollector:
    """Reads the router's latest poll of every worker."""

    def __init__(self, view_getter):
        self.view_getter = view_getter

    def collect(self):
        view = self.view_getter()
        used = GaugeMetricFamily("pdserve_kv_used_blocks", "KV blocks in use", labels=["worker", "role"])
        total = GaugeMetricFamily("pdserve_kv_total_blocks", "KV blocks allocated (quota)", labels=["worker", "role"])
        usage = GaugeMetricFamily("pdserve_kv_usage_ratio", "KV blocks in use / allocated", labels=["worker", "role"])
        waiting = GaugeMetricFamily("pdserve_worker_queue_depth", "Requests waiting in a worker", labels=["worker", "role"])
        running = GaugeMetricFamily("pdserve_worker_running", "Requests running in a worker", labels=["worker", "role"])
        stalled = GaugeMetricFamily("pdserve_worker_engine_stalled_seconds", "Seconds a worker's engine had made no "
                                    "progress (no step, command or idle wake-up) at its last poll",
                                    labels=["worker", "role"])
        hit = GaugeMetricFamily("pdserve_prefix_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens",
                                labels=["worker"])
        alarm = GaugeMetricFamily("pdserve_zero_overlap_alarm", "1 when prefixes repeat but no worker reports overlap "
                                  "(KV events probably not arriving)")
        counters = {
            "transfer_bytes": ("pdserve_transfer_bytes", "KV bytes transferred"),
            "transfer_seconds": ("pdserve_transfer_seconds", "Seconds spent in KV transfers"),
            "num_transfers": ("pdserve_transfers", "KV transfers"),
            "num_transfer_failures": ("pdserve_transfer_failures", "Failed KV transfers"),
            "num_leases_expired": ("pdserve_kv_leases_expired", "Pinned KV handles freed by lease expiry"),
            "num_local_prefills": ("pdserve_local_prefills", "Prefills run on the decode worker"),
            "num_prefill_fallbacks": ("pdserve_prefill_fallbacks", "Remote prefills that failed and re-ran locally"),
            "num_prefill_retries": ("pdserve_prefill_retries", "Remote prefills retried on another worker"),
            "num_preemptions": ("pdserve_preemptions", "Requests preempted for lack of KV blocks"),
            "num_import_waits": ("pdserve_import_waits", "KV imports that waited for free blocks on a decode worker"),
            "num_final_first_tokens": ("pdserve_final_first_tokens",
                                       "Remote prefills whose first token ended the request: no KV moved"),
            "num_prompt_tokens_cached": ("pdserve_prompt_tokens_cached", "Prompt tokens served from the prefix cache"),
            "num_compiles_serving": ("pdserve_compiles_while_serving", "Triton / torch.compile compiles a worker ran "
                                     "after it started serving (its engine stalls for each)"),
            "compile_seconds_serving": ("pdserve_compile_seconds_while_serving",
                                        "Seconds of pdserve_compiles_while_serving"),
        }
        families = {k: CounterMetricFamily(n, h, labels=["worker"]) for k, (n, h) in counters.items()}
        pending_s = CounterMetricFamily("pdserve_routed_prefill_seconds", "Seconds this router counted prompts as "
                                        "pending on the worker prefilling them (routing to first token), by path: "
                                        "local (the decode worker) or remote", labels=["path"])
        pending_n = CounterMetricFamily("pdserve_routed_prefills", "Prompts counted in "
                                        "pdserve_routed_prefill_seconds", labels=["path"])
        if view is not None:
            for wid, w in list(view.workers.items()):
                if w.state is None:
                    continue
                load, c, role = w.state.load, w.state.counters, w.info.role.value
                used.add_metric([wid, role], load.num_used_blocks)
                total.add_metric([wid, role], load.num_total_blocks)
                usage.add_metric([wid, role], load.num_used_blocks / max(1, load.num_total_blocks))
                waiting.add_metric([wid, role], load.num_waiting)
                running.add_metric([wid, role], load.num_running)
                stalled.add_metric([wid, role], load.engine_stalled_s)
                hit.add_metric([wid], c.num_prompt_tokens_cached / c.num_prompt_tokens if c.num_prompt_tokens else 0.0)
                for key, fam in families.items():
                    fam.add_metric([wid], float(getattr(c, key)))
            alarm.add_metric([], 1.0 if view.alarm.is_alarmed else 0.0)
            for path, (seconds, n) in view.prefill_pending.items():
                pending_s.add_metric([path], seconds)
                pending_n.add_metric([path], n)
        yield from (used, total, usage, waiting, running, stalled, hit, alarm, pending_s, pending_n,
                    *families.values())
