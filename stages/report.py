"""Stage `report`: what a person reads. reports/benchmark.json in the seed's schema, from the bench metrics."""

from __future__ import annotations

import logging

from antinet_npu import artifacts, verify
from antinet_npu.config import Config
from antinet_npu.provenance import host, versions

log = logging.getLogger("report")


def benchmark_json(cfg: Config, bench: dict[str, dict]) -> dict:
    """One seed-format entry (device, model, tests[]) per backend/precision that ran, plus what the seed lacks:
    which backend ran, whether it was emulated and why it fell back."""
    groups: dict[tuple, dict] = {}
    for m in sorted(bench.values(), key=lambda m: (m["requested_backend"], m["precision"], m["seq_len"])):
        key = (m["requested_backend"], m["precision"], m["backend"], m["device"])
        entry = groups.setdefault(key, {
            "device": m["device"], "model": m["model"], "backend": m["backend"],
            "requested_backend": m["requested_backend"], "precision": m["precision"],
            "precision_run": m["precision_run"], "emulated": m["emulated"], "fallback_reason": m["fallback_reason"],
            "tests": []})
        entry["tests"].append({k: m[k] for k in ("avg_latency_ms", "min_latency_ms", "max_latency_ms",
                                                 "throughput_qps")} | {"sequence_length": m["seq_len"]})
    for entry in groups.values():  # the seed's key order
        entry["tests"] = [{"sequence_length": t["sequence_length"], **{k: v for k, v in t.items()
                                                                       if k != "sequence_length"}}
                          for t in entry["tests"]]
    return {"model": cfg.model.name, "host": host(), "versions": versions(), "benchmarks": list(groups.values())}


def run(cfg: Config) -> dict:
    bench = verify.load_metrics("bench")
    report = benchmark_json(cfg, bench)
    out = artifacts.REPORTS / "benchmark.json"
    artifacts.write_json(out, report)
    log.info("%s: %d benchmarks of %s", out, len(report["benchmarks"]), cfg.model.name)
    return report
