"""Stage `bench` (one run per entry of bench.runs): latency of one forward pass on one backend.

The seed's protocol: preload, warm up (bench.warmup), time bench.iterations forward passes of S tokens of held-out
text, log every latency, and compare with the budget (bench.budget_ms). Writes metrics/bench/<run>.json (scalars)
and logs/bench/<run>.log (every timed latency); with `--device NAME` (a device measuring the builder's
artifacts) metrics/devices/<NAME>/bench/<run>.json and logs/devices/<NAME>/bench/<run>.log instead.
"""

from __future__ import annotations

import logging
import time

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, corpus
from antinet_npu.config import Config
from antinet_npu.measure.provenance import record
from antinet_npu.measure.timing import LatencyTracker
from antinet_npu.metrics import BENCH, device_root
from antinet_npu.runtime.backends.registry import open_run

log = logging.getLogger("bench")
LOGS = artifacts.LOGS / "bench"


def run(cfg: Config, run: str, device: str | None = None) -> dict:
    root = device_root(device)  # a bad device name fails before anything is measured
    bc = cfg.bench
    if run not in bc.runs:
        raise AntinetError(f"unknown bench run {run!r}: bench.runs has {', '.join(bc.runs)}")
    spec = bc.runs[run]
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    input_ids = corpus.windows(checkpoint.load_text_tokenizer(snapshot), corpus.split_documents(cfg.text)["eval"],
                               spec.seq_len, 1, "evaluation")

    start = time.perf_counter()
    backend, how = open_run(cfg, run)
    load_seconds = time.perf_counter() - start
    try:
        described = backend.describe()
        log.info("%s on %s (%s%s), S=%d: %d warm-up + %d timed runs", run, described["backend"], described["device"],
                 ", emulated" if described["emulated"] else "", spec.seq_len, bc.warmup, bc.iterations)
        for _ in range(bc.warmup):
            backend.run(input_ids)
        tracker = LatencyTracker()
        for _ in range(bc.iterations):
            with tracker.track():
                logits = backend.run(input_ids)
    finally:
        backend.close()
    if logits.shape[:2] != (1, spec.seq_len):
        raise AntinetError(f"{run}: {described['backend']} returned logits of shape {logits.shape}")

    stats = tracker.stats(tokens_per_run=spec.seq_len)
    within = stats["avg_latency_ms"] <= bc.budget_ms
    what_ran = {**described, **how, "perf_mode": described.get("perf_mode")}  # the backend that really ran
    metrics = record(model=cfg.model.name, run=run, precision=spec.precision, seq_len=spec.seq_len, **what_ran,
                     warmup=bc.warmup, **stats,
                     budget_ms=bc.budget_ms, within_budget=within, load_seconds=round(load_seconds, 3))
    logs = LOGS if device is None else artifacts.LOGS / "devices" / device / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(logs / f"{run}.log", "".join(f"run {i + 1} latency_ms {ms:.3f}\n"
                                                      for i, ms in enumerate(tracker.latencies_ms)))
    BENCH.write(metrics, run, root)
    tag = " [EMULATED: not NPU latency]" if described["emulated"] else ""
    log.info("%s: avg %.2f ms (min %.2f, max %.2f, p90 %.2f), %.2f QPS, %.0f tokens/s%s", run,
             stats["avg_latency_ms"], stats["min_latency_ms"], stats["max_latency_ms"], stats["p90_latency_ms"],
             stats["throughput_qps"], stats["tokens_per_s"], tag)
    if not within:
        log.warning("%s: average latency %.1f ms is over the %.0f ms budget%s", run, stats["avg_latency_ms"],
                    bc.budget_ms, tag)
    return metrics
