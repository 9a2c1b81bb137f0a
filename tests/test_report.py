"""Stage `report`: summary table, NPU/CPU/GPU comparison, device results merged, `dvc plots`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import clone_project, reproduce, run_cli

pytestmark = pytest.mark.slow


def test_summary_table_and_comparison(pipeline):
    summary = (pipeline.path / "reports/summary.md").read_text()
    assert "## tiny-qwen2" in summary and "| this machine | ort-cpu | int8-block | 32 |" in summary
    assert "| this machine | qnn-htp | w8a16 | 32 |" in summary and "**emulated**" in summary
    assert "### NPU vs CPU vs GPU at 128 tokens" in summary
    assert "| NPU | not measured on a real NPU |" in summary and "| GPU | not measured on a real GPU |" in summary
    assert "## Environment" in summary and "onnxruntime_qnn 2.7.0" in summary
    plots = (pipeline.path / "reports/plots/latency.csv").read_text().splitlines()
    assert plots[0] == "series,seq_len,avg_latency_ms,emulated" and len(plots) > 6


def test_dvc_plots_show_renders_the_series(pipeline, tmp_path):
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], cwd=pipeline.path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    html = (out / "index.html").read_text()
    for series in ("torch fp32", "ort-cpu int8-block", "qnn-htp w8a16 (emulated)", "npu w8a16-32", "cpu fp16"):
        assert f'"{series}"' in html, series
    assert "Latency of one forward pass vs sequence length" in html


def test_device_results_are_merged_and_ranked(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    assert reproduce(project, dry=True) == []
    # A result as `bench` writes it on a Snapdragon laptop (test input, shaped like the real file).
    device = project / "metrics/devices/x-elite-laptop/bench"
    device.mkdir(parents=True)
    m = json.loads((project / "metrics/bench/qnn-htp-w8a16-32.json").read_text())
    # faster than this machine's fastest CPU run at 128 tokens, whatever machine this is, so it ranks first
    runs = [json.loads(f.read_text()) for f in (project / "metrics/bench").glob("*-128.json")]
    avg = round(min(r["avg_latency_ms"] for r in runs if not r["emulated"]) / 2, 2)
    qps = round(1000 / avg, 2)
    m.update(run="qai-appbuilder-w8a16-128", seq_len=128, backend="qai-appbuilder", requested_backend="qai-appbuilder",
             device="hexagon-npu", emulated=False, avg_latency_ms=avg, p90_latency_ms=avg * 1.1, throughput_qps=qps,
             within_budget=True)
    (device / "qai-appbuilder-w8a16-128.json").write_text(json.dumps(m))
    assert reproduce(project, dry=True) == ["report"]  # only the report reads device results
    assert reproduce(project) == ["report"]
    summary = (project / "reports/summary.md").read_text()
    assert "| x-elite-laptop | qai-appbuilder | w8a16 | 128 |" in summary
    assert f"| NPU | qai-appbuilder w8a16 | x-elite-laptop (hexagon-npu) | {avg:.2f} | {qps:.2f} | 1 of 2 |" in summary
    bench = json.loads((project / "reports/benchmark.json").read_text())
    assert any(b["source"] == "x-elite-laptop" and b["device"] == "hexagon-npu" for b in bench["benchmarks"])
    shutil.rmtree(project / "metrics/devices/x-elite-laptop")
    assert run_cli(project, "report").returncode == 0
    assert "x-elite-laptop" not in (project / "reports/summary.md").read_text()
