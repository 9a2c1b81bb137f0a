"""Latency tracking for the benchmark protocols (single pass; prefill + decode): every run recorded, summary
statistics computed once."""

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


@dataclass
class GenerationTracker:
    """Times greedy generations: prompt in -> first new token's logits out (TTFT), then every decode step."""

    ttft_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def generate(self, stepper, prompt: np.ndarray, new_tokens: int) -> list[int]:
        """Exactly `new_tokens` greedy tokens (EOS does not stop a benchmark), timed."""
        clock = time.perf_counter_ns
        start = clock()
        logits = stepper.prefill(prompt)
        now = clock()
        ttft, out, steps = (now - start) / 1e6, [int(np.argmax(logits))], []
        for _ in range(new_tokens - 1):
            before = clock()
            logits = stepper.decode(out[-1])
            out.append(int(np.argmax(logits)))
            steps.append((clock() - before) / 1e6)
        self.add(out, ttft, steps, (clock() - start) / 1e6)
        return out

    def add(self, tokens: list[int], ttft_ms: float, decode_ms: list[float], e2e_ms: float) -> None:
        """One generation timed elsewhere (a runtime that samples for itself: its tokens' arrival times)."""
        self.ttft_ms.append(ttft_ms)
        self.decode_ms.extend(decode_ms)
        self.e2e_ms.append(e2e_ms)
        self.tokens.append(len(tokens))

    def stats(self) -> dict[str, float]:
        decode = np.asarray(self.decode_ms, dtype=np.float64)
        return {
            "ttft_ms": round(float(np.median(self.ttft_ms)), 3),
            "decode_tokens_per_s": round(1000.0 * decode.size / decode.sum(), 3),
            "p50_decode_ms_per_token": round(float(np.percentile(decode, 50)), 3),
            "p90_decode_ms_per_token": round(float(np.percentile(decode, 90)), 3),
            "e2e_ms": round(float(np.median(self.e2e_ms)), 3),
            "new_tokens": self.tokens[-1],
            "runs": len(self.ttft_ms),
        }
