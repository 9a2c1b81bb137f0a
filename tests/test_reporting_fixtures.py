"""Reporting and verify on metrics files as the stages write them (`tests/fixtures/metrics/`, a subset of a builtin
run): the fast tier, no pipeline. The same code runs on the built pipeline in test_report.py and test_bench.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from antinet_npu import AntinetError, config, metrics
from antinet_npu.measure import reporting, verify
from conftest import ROOT, TEST_OVERRIDES

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
MODEL = "tiny-qwen2"


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """A working copy of the fixtures as `metrics/` of a project in tmp_path (reporting reads `metrics/`)."""
    shutil.copytree(FIXTURES, tmp_path / "metrics")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "metrics"


def _cfg():
    """What the fixtures hold, as a config asks for it."""
    cfg = config.validate(config.compose(TEST_OVERRIDES, ROOT / "conf"), source="test")
    cfg.bench.runs = {k: v for k, v in cfg.bench.runs.items() if metrics.BENCH.path(k, FIXTURES).is_file()}
    cfg.bench.generation.runs = {k: v for k, v in cfg.bench.generation.runs.items()
                                 if metrics.BENCH_GEN.path(k, FIXTURES).is_file()}
    cfg.evaluate.variants = {k: v for k, v in cfg.evaluate.variants.items()
                             if metrics.EVALUATE.path(k, FIXTURES).is_file()}
    cfg.compile.precisions, cfg.compile.seq_lens = ["w8a16"], [32]
    cfg.compile.generation.precisions = ["w8a16"]
    return cfg


def test_every_fixture_is_of_a_known_kind_and_records_what_its_kind_requires():
    for path in FIXTURES.rglob("*.json"):
        stage = path.parent.name if path.parent != FIXTURES else path.stem
        kind = metrics.KINDS[stage]
        key = None if kind.template is None else path.stem
        assert kind.path(key, FIXTURES) == path
        assert kind.missing(kind.read_one(key, FIXTURES)) == [], path


def test_a_metrics_file_missing_what_its_kind_records_is_refused(tmp_path):
    with pytest.raises(TypeError, match="bench metrics must record .*emulated"):
        metrics.BENCH.write({"model": MODEL, "run": "x", "backend": "torch", "device": "cpu"}, "x", tmp_path)
    assert not (tmp_path / "bench").exists()
    assert metrics.COMPILE.key(precision="w8a16", seq_len=32) == "w8a16-32"
    assert metrics.EXPORT_NPU.path(metrics.EXPORT_NPU.key(seq_len=128)) == Path("metrics/export-npu/s128.json")


def test_summary_from_fixtures(root):
    sources = reporting.load_sources(model=MODEL)
    summary = reporting.summary_markdown(sources)
    assert f"## {MODEL}" in summary
    assert "| this machine | ort-cpu | int8-block | 32 |" in summary
    assert "| this machine | qnn-htp | w8a16 | 32 |" in summary and "**emulated**" in summary
    assert "| NPU | not measured on a real NPU |" in summary  # the emulated run is shown, never ranked
    assert "| genie-w8a16 | genie (emulated) | w8a16 |" in summary  # generation table, labelled
    assert "### Genie bundles (genie)" in summary and "### NPU generation parts (compile-gen)" in summary
    assert "### Fidelity by text domain" in summary and "| int8-block | news |" in summary
    assert "### Stages: time and peak memory" in summary and "| bench/torch-fp32-32 |" in summary
    speedups = reporting.speedups(sources)
    assert speedups["torch-fp32-32"]["speedup_vs_torch"] == 1.0
    assert "qnn-htp-w8a16-32" not in speedups  # emulated: no ratio


def test_a_device_result_is_merged_and_ranked_first_when_fastest(root):
    local = metrics.BENCH.read(root)
    best_cpu = min(m["avg_latency_ms"] for k, m in local.items() if k.endswith("-128") and not m["emulated"])
    m = dict(local["ort-cpu-int8-block-128"], run="qai-appbuilder-w8a16-128", backend="qai-appbuilder",
             requested_backend="qai-appbuilder", precision="w8a16", precision_run="w8a16", device="hexagon-npu",
             avg_latency_ms=round(best_cpu / 2, 3), emulated=False)
    device = metrics.BENCH.folder(root / metrics.DEVICES / "x-elite-laptop")
    device.mkdir(parents=True)
    (device / "qai-appbuilder-w8a16-128.json").write_text(json.dumps(m))
    summary = reporting.summary_markdown(reporting.load_sources(model=MODEL))
    assert "| x-elite-laptop | qai-appbuilder | w8a16 | 128 |" in summary
    assert "| NPU | qai-appbuilder w8a16 | x-elite-laptop (hexagon-npu) |" in summary and "| 1 of 2 |" in summary


def test_a_device_generation_run_is_listed_under_its_device_never_mixed_with_this_machines(root):
    m = dict(metrics.BENCH_GEN.read_one("genie-w8a16", root), device="hexagon-npu", emulated=False)
    folder = metrics.BENCH_GEN.folder(root / metrics.DEVICES / "x-elite-laptop")
    folder.mkdir(parents=True)
    (folder / "genie-w8a16.json").write_text(json.dumps(m))
    lines = "\n".join(reporting.generation_lines(MODEL))
    assert "| genie-w8a16 @ x-elite-laptop | genie | w8a16 |" in lines
    assert "| genie-w8a16 | genie (emulated) | w8a16 |" in lines


def test_a_damaged_fixture_is_one_line_naming_it(root):
    (root / "bench" / "torch-fp32-32.json").write_text("{not json")
    with pytest.raises(AntinetError, match=r"metrics/bench/torch-fp32-32.json is damaged .*dvc repro bench"):
        reporting.load_sources(model=MODEL)


def test_verify_on_fixtures(root):
    cfg = _cfg()
    _, problems = verify.verify(cfg, root)
    over = [p for p in problems if "ms >" in p]  # a fixture's CPU timing is whatever that machine measured
    assert problems == over
    # an emulated run over budget is shown but not judged
    path = metrics.BENCH.path("qnn-htp-w8a16-32", root)
    path.write_text(json.dumps(dict(json.loads(path.read_text()), avg_latency_ms=9999.0, within_budget=False)))
    assert verify.verify(cfg, root)[1] == problems
    # a missing result, a damaged one, one for another model, a failed gate: each named
    metrics.EVALUATE.path("int8-block", root).unlink()
    metrics.COMPILE.path("w8a16-32", root).write_text("[]")
    path = metrics.COMPILE_GEN.path("w8a16", root)
    path.write_text(json.dumps(dict(json.loads(path.read_text()), gate_passed=False)))
    path = metrics.BENCH_GEN.path("genie-w8a16", root)
    path.write_text(json.dumps(dict(json.loads(path.read_text()), model="other")))
    lines, problems = verify.verify(cfg, root)
    text = "\n".join(problems)
    assert "evaluate int8-block: no result" in text
    assert "compile w8a16-32: " in text and "does not hold a metrics object" in text
    assert "compile-gen w8a16: fidelity gate failed" in text
    assert "bench-gen genie-w8a16: the result is for model 'other'" in text
    assert any(line.startswith("compile-gen w8a16") and "GATE FAILED" in line for line in lines)
