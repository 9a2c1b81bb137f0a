"""Latency tracking for the benchmark protocol: every run recorded, summary statistics computed once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LatencyTracker:
    """Collects wall-clock latencies (ms) of timed runs; `stats()` summarises them."""

    latencies_ms: list[float] = field(default_factory=list)

    @contextmanager
    def track(self) -> Iterator[None]:
        start = time.perf_counter_ns()
        yield
        self.latencies_ms.append((time.perf_counter_ns() - start) / 1e6)

    def stats(self, tokens_per_run: int) -> dict[str, float]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        avg = float(lat.mean())
        return {
            "avg_latency_ms": round(avg, 3),
            "min_latency_ms": round(float(lat.min()), 3),
            "max_latency_ms": round(float(lat.max()), 3),
            "p50_latency_ms": round(float(np.percentile(lat, 50)), 3),
            "p90_latency_ms": round(float(np.percentile(lat, 90)), 3),
            "std_latency_ms": round(float(lat.std()), 3),
            "throughput_qps": round(1000.0 / avg, 4),
            "tokens_per_s": round(tokens_per_run * 1000.0 / avg, 2),
            "runs": len(lat),
        }
