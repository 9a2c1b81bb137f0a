"""What `serve` measures about itself: Prometheus metrics (`GET /metrics`) and a short history of recent requests
for the dashboard (`GET /api/stats`). Every figure is taken from requests as they run; nothing here runs the model
except the optional idle-time benchmark (`serve.bench_every_s`)."""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

# Outcomes of a request to the model: every counted request ends in exactly one.
OUTCOMES = ("answered", "rejected", "cancelled", "timeout", "failed")
_LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_STEP_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)


@dataclass(frozen=True)
class RequestRecord:
    """One finished request to the model, as the dashboard plots it."""

    t: float                 # unix time it finished
    endpoint: str
    outcome: str
    ttft_ms: float | None    # request in -> first token (or first answer) out; None: none came
    latency_ms: float
    tokens_in: int
    tokens_out: int
    cached_tokens: int


class ServeMonitor:
    def __init__(self, budget_ms: float, history: int = 600):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.budget_ms = budget_ms
        self.registry = r = CollectorRegistry()
        self.requests = Counter("antinet_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.outcomes = Counter("antinet_model_requests", "requests to the model by outcome (answered, rejected, "
                                "cancelled, timeout, failed)", ["outcome"], registry=r)
        self.ttft = Histogram("antinet_ttft_seconds", "request received -> first token (or answer) sent",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.step = Histogram("antinet_decode_step_seconds", "one decode step (one new token) at the model",
                              buckets=_STEP_BUCKETS, registry=r)
        self.latency = Histogram("antinet_request_seconds", "request received -> last byte", buckets=_LATENCY_BUCKETS,
                                 registry=r)
        self.tokens = Counter("antinet_tokens", "tokens by direction (prompt in, generated out)", ["direction"],
                              registry=r)
        self.over_budget = Counter("antinet_over_budget", f"requests whose first token took longer than the "
                                   f"{budget_ms:g} ms budget (bench.budget_ms)", registry=r)
        self.queue_depth = Gauge("antinet_queue_depth", "requests waiting for the model", registry=r)
        self.in_flight = Gauge("antinet_in_flight", "requests at the model (0 or 1)", registry=r)
        self.cache_hits = Counter("antinet_prefix_cache_hits", "prompts resumed from a cached prefix", registry=r)
        self.cache_misses = Counter("antinet_prefix_cache_misses", "prompts run from the start", registry=r)
        self.cache_tokens = Counter("antinet_prefix_cache_tokens", "prompt tokens served from the prefix cache",
                                    registry=r)
        self.cache_bytes = Gauge("antinet_prefix_cache_bytes", "bytes held by the prefix cache", registry=r)
        self.cache_entries = Gauge("antinet_prefix_cache_entries", "sessions held by the prefix cache", registry=r)
        self.ready = Gauge("antinet_model_ready", "1 when the model is loaded and serving", registry=r)
        self.model = Info("antinet_model", "what is served: run, backend, device, emulated, fallback", registry=r)
        self.bench_ttft = Gauge("antinet_bench_ttft_seconds", "idle-time benchmark: prefill of 32 tokens", registry=r)
        self.bench_tps = Gauge("antinet_bench_decode_tokens_per_second", "idle-time benchmark: decode rate",
                               registry=r)
        self.bench_runs = Counter("antinet_bench_runs", "idle-time benchmarks run", registry=r)
        self.rss = Gauge("antinet_process_rss_bytes", "resident memory of the server process", registry=r)
        self.totals: Tally = Tally()  # the same counts, for the dashboard (prometheus_client's values are private)
        self._recent: deque[RequestRecord] = deque(maxlen=history)
        self._bench: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def describe_model(self, info: dict) -> None:
        keys = ("model", "run", "backend", "device", "precision_run", "emulated", "fallback_reason")
        self.model.info({k: str(info.get(k)) for k in keys})
        self.ready.set(1)

    def record(self, rec: RequestRecord) -> None:
        self.outcomes.labels(rec.outcome).inc()
        self.totals[rec.outcome] += 1
        if rec.outcome == "rejected":
            return
        self.latency.observe(rec.latency_ms / 1000)
        if rec.ttft_ms is not None:
            self.ttft.observe(rec.ttft_ms / 1000)
            if rec.ttft_ms > self.budget_ms:
                self.over_budget.inc()
                self.totals["over_budget"] += 1
        self.tokens.labels("in").inc(rec.tokens_in)
        self.tokens.labels("out").inc(rec.tokens_out)
        with self._lock:
            self._recent.append(rec)

    def cache_used(self, cached_tokens: int) -> None:
        (self.cache_hits if cached_tokens else self.cache_misses).inc()
        self.totals["cache_hits" if cached_tokens else "cache_misses"] += 1
        self.cache_tokens.inc(cached_tokens)

    def bench_result(self, stats: dict) -> None:
        self.bench_ttft.set(stats["ttft_ms"] / 1000)
        self.bench_tps.set(stats["decode_tokens_per_s"])
        self.bench_runs.inc()
        with self._lock:
            self._bench = {"t": time.time(), **stats}

    def refresh(self, engine) -> None:
        """Gauges read at scrape time."""
        import psutil

        self.queue_depth.set(engine.depth)
        self.in_flight.set(1 if engine.busy else 0)
        if engine.cache is not None:
            self.cache_bytes.set(engine.cache.nbytes)
            self.cache_entries.set(len(engine.cache))
        self.rss.set(psutil.Process().memory_info().rss)

    def exposition(self, engine) -> bytes:
        from prometheus_client import generate_latest

        self.refresh(engine)
        return generate_latest(self.registry)

    def stats(self, engine, since: float = 0.0) -> dict:
        """The dashboard's feed: recent requests after `since`, counters, queue and cache state."""
        import psutil

        with self._lock:
            recent = [asdict(r) for r in self._recent if r.t > since]
            bench = self._bench
        cache = engine.cache
        return {"budget_ms": self.budget_ms, "recent": recent, "outcomes": {o: self.totals[o] for o in OUTCOMES},
                "queue_depth": engine.depth, "in_flight": int(engine.busy), "over_budget": self.totals["over_budget"],
                "prefix_cache": {"hits": self.totals["cache_hits"], "misses": self.totals["cache_misses"],
                                 "bytes": cache.nbytes if cache else 0, "entries": len(cache) if cache else 0},
                "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "bench": bench, "time": time.time()}
