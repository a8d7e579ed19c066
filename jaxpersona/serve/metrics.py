"""``/metrics``: Prometheus metrics under vLLM's names with a ``jaxpersona:`` prefix.

A dashboard built for vLLM maps one to one by replacing the ``vllm:`` prefix:

====================================================  ============================================
``jaxpersona:num_requests_running`` / ``_waiting``    gauges (sequences in batch rows / queued)
``jaxpersona:kv_cache_usage_perc``                    gauge: cache slots in use / all slots (0..1)
``jaxpersona:prompt_tokens_total``                    counter
``jaxpersona:generation_tokens_total``                counter
``jaxpersona:request_success_total{finished_reason}``  counter (stop, length, cancelled, error)
``jaxpersona:time_to_first_token_seconds``            histogram
``jaxpersona:inter_token_latency_seconds``            histogram
``jaxpersona:e2e_request_latency_seconds``            histogram
``jaxpersona:prefix_cache_queries_total`` / ``_hits``  counters (prompt tokens looked up / found)
====================================================  ============================================

plus ``jaxpersona:interventions_total{kind}`` (steer, cap, ablate, preset, mixture, readout) and
``jaxpersona:adapter_requests_total{adapter}``. Every series carries ``model_name``. Each server has
its own registry (no process-global state); gauges and the engine's own counters are read at scrape time.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "jaxpersona:"
# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)


class _EngineCollector:
    """Gauges and engine-side counters, read from the engine when scraped."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Any:
        busy = self.engine.busy()
        labels = ["model_name"]
        for name, doc, value in (
                ("num_requests_running", "Sequences in batch rows (decoding).", busy["running"]),
                ("num_requests_waiting", "Sequences waiting for a batch row.", busy["queued"]),
                ("kv_cache_usage_perc", "KV-cache slots in use over all slots (1 = full).",
                 self.engine.cache_usage())):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric([self.model_name], float(value))
            yield g
        stats = self.engine.stats
        for name, key, doc in (("prefix_cache_queries", "prefix_queries", "Prompt tokens looked up in the prefix cache."),
                               ("prefix_cache_hits", "prefix_hits", "Prompt tokens found in the prefix cache."),
                               ("num_decode_steps", "steps", "Batched decode steps run."),
                               ("num_prefills", "prefills", "Prefill calls run.")):
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric([self.model_name], float(stats.get(key, 0)))
            yield c


class Metrics:
    """The server's metrics. ``observe_*`` are called from any thread (prometheus-client is thread-safe)."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        m = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted requests.", m, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", m, registry=r)
        self.success = Counter(PREFIX + "request_success", "Finished sequences by finish reason.",
                               [*m, "finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time from submission to the first token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between a sequence's tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Time from submission to the last token.", m,
                             buckets=E2E_BUCKETS, registry=r)
        self.interventions = Counter(PREFIX + "interventions", "Intervention items requested, by kind.",
                                     [*m, "kind"], registry=r)
        self.adapters = Counter(PREFIX + "adapter_requests", "Requests by adapter (base: none).", [*m, "adapter"],
                                registry=r)
        self.http = Counter(PREFIX + "http_responses", "HTTP responses by status code.", [*m, "status"], registry=r)
        r.register(_EngineCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- per request ------------------------------------------------------------------------------
    def admitted(self, prompt_tokens: int, kinds: list[str], adapter: str | None) -> None:
        name = self.model_name
        self.prompt_tokens.labels(name).inc(prompt_tokens)
        for k in kinds:
            self.interventions.labels(name, k).inc()
        self.adapters.labels(name, adapter or "none").inc()

    def response(self, status: int) -> None:
        self.http.labels(self.model_name, str(status)).inc()


class TimedEvents:
    """A request's event queue that times its choices for the latency histograms as the engine puts events
    (engine thread): ``put`` records time to first token, inter-token gaps and end-to-end latency."""

    def __init__(self, inner: Any, metrics: Metrics) -> None:
        self.inner, self.metrics = inner, metrics
        self.t0 = time.perf_counter()
        self.last: dict[int, float] = {}
        self._lock = threading.Lock()

    def put(self, ev: tuple) -> None:
        now, m, name = time.perf_counter(), self.metrics, self.metrics.model_name
        with self._lock:
            if ev[0] == "delta":
                prev = self.last.get(ev[1])
                (m.ttft if prev is None else m.itl).labels(name).observe(now - (self.t0 if prev is None else prev))
                self.last[ev[1]] = now
            elif ev[0] == "done":
                m.e2e.labels(name).observe(now - self.t0)
                m.generation_tokens.labels(name).inc(ev[3].get("completion_tokens", 0))
                m.success.labels(name, ev[2]).inc()
            elif ev[0] == "error":
                m.success.labels(name, "error").inc()
        self.inner.put(ev)

    def get(self, *a: Any, **kw: Any) -> Any:
        return self.inner.get(*a, **kw)
