"""Stage `bench`, the runtime backends, the fallback chain, `report` and `verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from antinet_npu import AntinetError, config
from antinet_npu.runtime.backends import registry as backends
from antinet_npu.runtime.backends.appbuilder import AppBuilderBackend
from conftest import TEST_OVERRIDES, clone_project, error_line, run_cli

pytestmark = pytest.mark.slow


def _bench(project, run):
    return json.loads((project / "metrics/bench" / f"{run}.json").read_text())


def _cfg(project, *overrides):
    return config.validate(config.compose([*TEST_OVERRIDES, *overrides], project / "conf"), source="test")


def test_repro_writes_bench_metrics_report_and_verify_runs(pipeline):
    runs = ["torch-fp32-32", "ort-cpu-fp32-128", "ort-cpu-fp16-32", "ort-cpu-int8-dynamic-128",
            "ort-cpu-int8-block-32", "qnn-htp-w8a16-32"]
    assert {f"bench@{r}" for r in runs} | {"report"} <= set(pipeline.first_run)
    for run in runs:
        m = _bench(pipeline.path, run)
        assert m["runs"] == 3 and m["warmup"] == 1
        assert 0 < m["min_latency_ms"] <= m["p50_latency_ms"] <= m["p90_latency_ms"] <= m["max_latency_ms"]
        assert m["throughput_qps"] == pytest.approx(1000 / m["avg_latency_ms"], rel=1e-3)
        assert m["requested_backend"] == m["backend"] and m["fallback_reason"] is None
        assert isinstance(m["within_budget"], bool) and m["peak_rss_mb"] > 0
        log = (pipeline.path / "logs/bench" / f"{run}.log").read_text().splitlines()
        assert len(log) == 3 and log[0].startswith("run 1 latency_ms ")
    htp = _bench(pipeline.path, "qnn-htp-w8a16-32")
    assert htp["emulated"] is True and htp["device"] == "hexagon-htp-emulator" and htp["perf_mode"] == "burst"

    report = json.loads((pipeline.path / "reports/benchmark.json").read_text())
    entry = next(b for b in report["benchmarks"] if b["backend"] == "qnn-htp")
    assert entry["emulated"] is True and entry["model"] == "tiny-qwen2" and entry["device"]
    assert list(entry["tests"][0]) == ["sequence_length", "avg_latency_ms", "min_latency_ms", "max_latency_ms",
                                       "throughput_qps"]
    proc = run_cli(pipeline.path, "verify")
    # the verdict follows the measured latencies (a loaded machine can push a CPU run over its budget)
    assert proc.returncode == (0 if _within_budget(pipeline.path) else 1)
    assert "emulated: timing not judged" in proc.stdout


def test_every_available_backend_matches_ort_cpu_fp32(pipeline, monkeypatch):
    monkeypatch.chdir(pipeline.path)
    cfg = _cfg(pipeline.path)
    ids = np.random.default_rng(0).integers(0, 2048, (1, 32)).astype(np.int64)
    reference, _ = backends.open_run(cfg, "ort-cpu-fp32-32")
    expected = reference.run(ids)
    for run, check in (("torch-fp32-32", "exact"), ("ort-cpu-fp16-32", "close"), ("ort-cpu-int8-block-32", "close"),
                       ("qnn-htp-w8a16-32", "close")):
        backend, how = backends.open_run(cfg, run)
        got = backend.run(ids)
        backend.close()
        assert how["backend"] == cfg.bench.runs[run].backend and got.shape == expected.shape
        if check == "exact":
            assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max(), run  # relative to the logits
        a, b = got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])
        cosine = ((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).mean()
        assert cosine > 0.999, (run, cosine)


def test_static_backend_rejects_wrong_length(pipeline, monkeypatch):
    monkeypatch.chdir(pipeline.path)
    backend, _ = backends.open_run(_cfg(pipeline.path), "qnn-htp-w8a16-32")
    with pytest.raises(AntinetError, match="static graph of exactly 32 tokens, got 20"):
        backend.run(np.zeros((1, 20), np.int64))


APPBUILDER_RUN = ("+bench.runs.qai-appbuilder-w8a16-32={backend: qai-appbuilder, precision: w8a16, seq_len: 32, "
                  "model: qnn/tiny-qwen2-w8a16-s32_ctx.onnx, weights: qnn/tiny-qwen2-w8a16-s32_ctx_qnn.bin}")


def test_fallback_from_appbuilder_to_qnn_htp_is_recorded(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    proc = run_cli(project, "bench", "--run", "qai-appbuilder-w8a16-32", *TEST_OVERRIDES, APPBUILDER_RUN)
    assert proc.returncode == 0, proc.stderr
    assert "qai-appbuilder unavailable for qai-appbuilder-w8a16-32" in proc.stderr
    m = _bench(project, "qai-appbuilder-w8a16-32")
    assert (m["requested_backend"], m["backend"], m["precision_run"]) == ("qai-appbuilder", "qnn-htp", "w8a16")
    assert "runs only on Windows on Snapdragon" in m["fallback_reason"] and m["emulated"] is True


def test_fallback_to_cpu_when_qnn_is_missing(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    blocker = tmp_path / "block" / "onnxruntime_qnn"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block")}
    proc = subprocess.run([sys.executable, "-m", "antinet_npu", "bench", "--run", "qnn-htp-w8a16-32"], cwd=project,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = _bench(project, "qnn-htp-w8a16-32")
    assert (m["requested_backend"], m["backend"], m["device"]) == ("qnn-htp", "ort-cpu", "cpu")
    assert m["precision_run"] == "int8-block" and m["emulated"] is False
    assert "onnxruntime-qnn is not installed" in m["fallback_reason"]


def test_perf_mode_the_runtime_lacks_and_unknown_names(pipeline):
    line = error_line(run_cli(pipeline.path, "bench", "--run", "qai-appbuilder-w8a16-32", *TEST_OVERRIDES,
                              APPBUILDER_RUN, "bench.perf_mode=power_saver"), "bench")
    assert "qai-appbuilder has no perf mode 'power_saver': choose one of default, high_performance, burst" in line
    line = error_line(run_cli(pipeline.path, "bench", "--run", "torch-fp32-32", "bench.perf_mode=turbo"), "bench")
    assert "unknown bench.perf_mode 'turbo'" in line
    line = error_line(run_cli(pipeline.path, "bench", "--run", "tpu-fp32-32"), "bench")
    assert "unknown bench run 'tpu-fp32-32'" in line
    line = error_line(run_cli(pipeline.path, "bench", "--run", "tpu-fp32-32", *TEST_OVERRIDES,
                              "+bench.runs.tpu-fp32-32={backend: tpu, precision: fp32, seq_len: 32, model: x, "
                              "weights: x}"), "bench")
    assert "unknown backend 'tpu'" in line


def test_missing_artifact_names_the_stage(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    (project / "models/onnx/tiny-qwen2-fp16.onnx").unlink()
    line = error_line(run_cli(project, "bench", "--run", "ort-cpu-fp16-32"), "bench")
    assert "tiny-qwen2-fp16.onnx not found for run ort-cpu-fp16-32 on ort-cpu: run `dvc repro`" in line


class _FakeAppBuilder:
    """The documented qai_appbuilder API surface, recording every call (no hardware here)."""

    def __init__(self, logits):
        self.calls = []
        rec, out = self.calls, logits
        enum = types.SimpleNamespace
        self.module = types.ModuleType("qai_appbuilder")
        self.module.Runtime = enum(HTP="HTP", CPU="CPU")
        self.module.LogLevel = enum(ERROR=1, WARN=2)
        self.module.ProfilingLevel = enum(OFF=0, BASIC=1)
        self.module.DataType = enum(FLOAT="float", NATIVE="native")

        class QNNConfig:
            @staticmethod
            def Config(qnn_lib_path="None", runtime="HTP", log_level=1, profiling_level=0, log_path="None"):
                rec.append(("Config", qnn_lib_path, runtime))

        class PerfProfile:
            DEFAULT, HIGH_PERFORMANCE, BURST = "default", "high_performance", "burst"

            @staticmethod
            def SetPerfProfileGlobal(profile):
                rec.append(("SetPerfProfileGlobal", profile))

            @staticmethod
            def RelPerfProfileGlobal():
                rec.append(("RelPerfProfileGlobal",))

        class QNNContext:
            def __init__(self, model_name, model_path, backend_lib_path="None", system_lib_path="None",
                         is_async=False, input_data_type="float", output_data_type="float"):
                rec.append(("QNNContext", model_name, model_path, input_data_type))

            def Inference(self, input, perf_profile="default", graphIndex=0):
                rec.append(("Inference", [(a.shape, a.dtype) for a in input]))
                return [out.reshape(-1)]  # AppBuilder hands back flat float32 buffers

        self.module.QNNConfig, self.module.PerfProfile, self.module.QNNContext = QNNConfig, PerfProfile, QNNContext


def test_appbuilder_backend_follows_the_documented_api(pipeline, monkeypatch):
    """Against AppBuilder's documented API only: untested on Snapdragon hardware here."""
    import antinet_npu.runtime.backends.appbuilder as ab

    assert AppBuilderBackend.unavailable_reason() == f"qai-appbuilder runs only on Windows on Snapdragon (this is " \
                                                     f"{sys.platform})"
    monkeypatch.chdir(pipeline.path)
    logits = np.random.default_rng(1).standard_normal((1, 32, 2048)).astype(np.float32)
    fake = _FakeAppBuilder(logits)
    monkeypatch.setitem(sys.modules, "qai_appbuilder", fake.module)
    monkeypatch.setattr(ab, "_configured", False)
    backend = AppBuilderBackend(_cfg(pipeline.path), "burst")
    backend.load(pipeline.path / "models/qnn/tiny-qwen2-w8a16-s32_ctx.onnx")
    out = backend.run(np.arange(32)[None])
    backend.close()
    assert np.array_equal(out, logits)
    binary = str(pipeline.path / "models/qnn/tiny-qwen2-w8a16-s32_ctx_qnn.bin")
    assert fake.calls == [
        ("Config", "None", "HTP"),
        ("QNNContext", "tiny-qwen2-w8a16-s32_ctx_qnn", binary, "float"),
        ("SetPerfProfileGlobal", "burst"),
        ("Inference", [((1, 32), np.float32), ((1, 1, 32, 32), np.float32), ((1, 32), np.float32)]),
        ("RelPerfProfileGlobal",),
    ]
    with pytest.raises(AntinetError, match="has no perf mode 'power_saver'"):
        AppBuilderBackend(_cfg(pipeline.path), "power_saver").load(
            pipeline.path / "models/qnn/tiny-qwen2-w8a16-s32_ctx.onnx")


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _within_budget(project) -> bool:
    return all(m["emulated"] or m["within_budget"]
               for m in (json.loads(f.read_text()) for f in (project / "metrics/bench").glob("*.json")))


def test_verify_exit_codes(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    for f in (project / "metrics/bench").glob("*.json"):  # start compliant, whatever load the machine was under
        m = json.loads(f.read_text())
        if not m["emulated"] and not m["within_budget"]:
            _edit(f, avg_latency_ms=m["budget_ms"] / 2, within_budget=True)
    assert run_cli(project, "verify").returncode == 0
    # an emulated run over budget is shown but not judged
    _edit(project / "metrics/bench/qnn-htp-w8a16-32.json", avg_latency_ms=9999.0, within_budget=False)
    assert run_cli(project, "verify").returncode == 0
    # a real run over budget is not compliant
    _edit(project / "metrics/bench/ort-cpu-fp32-32.json", avg_latency_ms=9999.0, within_budget=False)
    proc = run_cli(project, "verify")
    assert proc.returncode == 1 and "ort-cpu-fp32-32: 9999.0 ms > 500 ms on cpu" in proc.stdout
    _edit(project / "metrics/bench/ort-cpu-fp32-32.json", avg_latency_ms=1.0, within_budget=True)
    _edit(project / "metrics/evaluate/int8-block.json", gate_passed=False)
    proc = run_cli(project, "verify")
    assert proc.returncode == 1 and "evaluate int8-block: fidelity gate failed" in proc.stdout
    assert error_line(run_cli(tmp_path, "verify"), "verify").endswith("params.yaml not found: run from the project "
                                                                    "root, or write it with `antinet-npu compose`")


def test_verify_fails_on_missing_damaged_or_unjudged_results(pipeline, tmp_path):
    import shutil

    project = clone_project(pipeline.path, tmp_path / "p")
    (project / "metrics/evaluate/int8-block.json").unlink()
    shutil.rmtree(project / "metrics/compile")
    shutil.rmtree(project / "metrics/compile-gen")
    proc = run_cli(project, "verify")
    assert proc.returncode == 1
    assert "evaluate int8-block: no result (metrics/evaluate/int8-block.json missing)" in proc.stdout
    assert "compile w8a16-32: no result" in proc.stdout and "compile-gen w8a16: no result" in proc.stdout
    project = clone_project(pipeline.path, tmp_path / "q")
    (project / "metrics/bench/ort-cpu-fp16-32.json").write_text("{not json")
    _edit(project / "metrics/bench/ort-cpu-fp32-32.json", within_budget="false")
    data = json.loads((project / "metrics/evaluate/fp16.json").read_text())
    del data["gate_passed"]
    (project / "metrics/evaluate/fp16.json").write_text(json.dumps(data))
    _edit(project / "metrics/bench-gen/ort-cpu-fp32.json", p32=None)
    device = project / "metrics/devices/x-elite/bench"
    device.mkdir(parents=True)
    (device / "qai-appbuilder-w8a16-128.json").write_text(json.dumps(
        {"backend": "qai-appbuilder", "device": "hexagon-npu", "emulated": False, "avg_latency_ms": 900.0,
         "budget_ms": 500.0, "within_budget": False}))
    proc = run_cli(project, "verify")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    for problem in ("bench ort-cpu-fp16-32: metrics/bench/ort-cpu-fp16-32.json is damaged",
                    "ort-cpu-fp32-32: no judgeable result", "evaluate fp16: no gate verdict",
                    "bench-gen ort-cpu-fp32: no figures for every prompt length",
                    "x-elite: qai-appbuilder-w8a16-128: 900.0 ms > 500 ms on hexagon-npu"):
        assert problem in proc.stdout, problem


def test_device_only_backends_say_why_they_are_unavailable_here():
    import platform

    from antinet_npu.runtime.backends.qnn_ep import QnnGpuBackend

    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "needs an Adreno GPU" in QnnGpuBackend.unavailable_reason()
    assert "Windows on Snapdragon" in AppBuilderBackend.unavailable_reason() or sys.platform == "win32"
    assert set(backends.registry()) == set(config.BACKENDS)
