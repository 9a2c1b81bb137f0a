"""Stage `report`: reports/summary.md, reports/benchmark.json (the seed's schema) and the data behind `dvc plots`.

Reads only metrics: this machine's and any device's dropped into metrics/devices/<device>/.
"""

from __future__ import annotations

import csv
import io
import logging

from antinet_npu import AntinetError, artifacts
from antinet_npu.config import Config
from antinet_npu.measure import reporting
from antinet_npu.metrics import SPEEDUP

log = logging.getLogger("report")
PLOTS = artifacts.REPORTS / "plots"


def _csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run(cfg: Config) -> dict:
    sources = reporting.load_sources(model=cfg.model.name)
    if not sources[0].bench:
        raise AntinetError("no benchmark metrics under metrics/bench/: run `dvc repro bench` first")
    summary = reporting.summary_markdown(sources)
    report = reporting.benchmark_json(sources, cfg.model.name)
    latency, fidelity = reporting.plot_rows(sources)
    artifacts.write_texts({  # all or none: a failure leaves the previous report whole
        artifacts.REPORTS / "summary.md": summary,
        artifacts.REPORTS / "benchmark.json": artifacts.json_text(report),
        SPEEDUP.path(): artifacts.metrics_text(reporting.speedups(sources)),
        PLOTS / "latency.csv": _csv(latency, ["series", "seq_len", "avg_latency_ms", "emulated"]),
        PLOTS / "fidelity.csv": _csv(fidelity, ["variant", "size_mb", "top1_agreement", "cosine"]),
        PLOTS / "generation.csv": _csv(reporting.generation_rows(cfg.model.name),
                                       ["series", "run", "prompt_len", "decode_tokens_per_s", "ttft_ms"]),
        PLOTS / "sensitivity.csv": _csv(reporting.sensitivity_rows(cfg.model.name),
                                        ["probe", "group", "rank", "kl", "top1_agreement"]),
    })
    devices = [s.name for s in sources[1:]]
    log.info("reports/summary.md, reports/benchmark.json (%d benchmarks), reports/plots/ (%d latency points)%s",
             len(report["benchmarks"]), len(latency), f"; device results merged: {', '.join(devices)}" if devices
             else "")
    return report
