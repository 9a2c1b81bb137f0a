"""Generation: the loop and its errors (fast), then bench-gen (ours and onnxruntime-genai), generation agreement in
evaluate, the report and the bad inputs of a built pipeline."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from antinet_npu import AntinetError
from antinet_npu.runtime import generation
from conftest import clone_project, error_line, run_cli


class CountingStepper:
    """Logits that favour token (last + 1) % vocab: greedy continues 5, 6, 7, ..."""

    context_length = 20

    def __init__(self, vocab=10):
        self.vocab, self.calls = vocab, []

    def _logits(self, last):
        out = np.zeros(self.vocab, np.float32)
        out[(last + 1) % self.vocab] = 1.0
        return out

    def prefill(self, prompt):
        self.calls.append(("prefill", len(prompt)))
        return self._logits(int(prompt[-1]))

    def decode(self, token):
        self.calls.append(("decode", token))
        return self._logits(token)


def test_generate_prefills_once_then_decodes_one_token_per_step():
    stepper = CountingStepper()
    assert list(generation.generate(stepper, [3, 4], 4)) == [5, 6, 7, 8]
    assert stepper.calls == [("prefill", 2), ("decode", 5), ("decode", 6), ("decode", 7)]
    assert list(generation.generate(stepper, [3, 4], 8, eos_ids=(8,))) == [5, 6, 7]  # EOS ends it, not yielded


def test_generation_requests_that_cannot_run():
    stepper = CountingStepper()
    with pytest.raises(AntinetError, match="prompt of 15 tokens \\+ max_new_tokens 6 exceed the model's 20 positions"):
        list(generation.generate(stepper, list(range(15)), 6))
    with pytest.raises(AntinetError, match="max_new_tokens must be > 0, got 0"):
        list(generation.generate(stepper, [1], 0))
    with pytest.raises(AntinetError, match="the prompt is empty"):
        list(generation.generate(stepper, [], 3))
    assert stepper.calls == []  # checked before any work


def test_sampling_greedy_seeded_and_top_k():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    assert generation.Sampling().picker()(logits) == 3
    draws = [generation.Sampling(temperature=1.0, seed=3).picker()(logits) for _ in range(2)]
    assert draws[0] == draws[1]
    pick = generation.Sampling(temperature=5.0, top_k=2, seed=0).picker()
    assert {pick(logits) for _ in range(200)} == {2, 3}


def test_ort_genai_missing_names_the_extra(monkeypatch):
    from antinet_npu.runtime.backends.ort_genai import OrtGenaiBackend

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import fails as if not installed
    assert "pip install 'antinet-npu[genai]'" in OrtGenaiBackend.unavailable_reason()


def test_generation_runs_must_be_backends_that_can_generate():
    from antinet_npu.config import GenerationBenchConfig, GenRunConfig

    runs = {"qnn-gpu-fp32": GenRunConfig(backend="qnn-gpu", precision="fp32", model="m", weights="w")}
    with pytest.raises(AntinetError, match="cannot generate: use one of torch, ort-cpu, qnn-htp, qai-appbuilder, "
                                           "ort-genai, llama-cpp, genie"):
        GenerationBenchConfig(runs=runs).check()
    runs = {"ort-cpu-fp32": GenRunConfig(backend="ort-cpu", precision="fp32", model="m", weights="w", cache=False)}
    with pytest.raises(AntinetError, match="must be named ort-cpu-fp32-nocache"):
        GenerationBenchConfig(runs=runs).check()


# --- on the built pipeline -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_repro_writes_generation_metrics_for_ours_and_the_peer(pipeline):
    from antinet_npu.config import load

    gen = load(pipeline.path / "params.yaml").bench.generation
    runs = {p.stem: json.loads(p.read_text()) for p in (pipeline.path / "metrics/bench-gen").glob("*.json")}
    assert set(runs) == set(gen.runs)
    assert {"ort-cpu-int8-block", "ort-genai-int8", "ort-cpu-int8-block-nocache", "torch-fp32",
            "qnn-htp-w8a16"} <= set(runs)
    for run, m in runs.items():
        backend = gen.runs[run].backend
        npu = backend in ("qnn-htp", "genie")  # on x86_64: the HTP emulator
        device = ("hexagon-htp-emulator", True) if npu else ("cpu", False)
        assert (m["device"], m["emulated"], m["backend"]) == (*device, backend)
        assert m["kv_cache"] is gen.runs[run].cache and m["peak_rss_mb"] > 0
        for p in gen.prompt_lens:
            f = m[f"p{p}"]
            assert f["new_tokens"] == (gen.runs[run].new_tokens or gen.new_tokens) and f["runs"] == gen.iterations
            assert 0 < f["p50_decode_ms_per_token"] <= f["p90_decode_ms_per_token"]
            assert f["ttft_ms"] > 0 and f["decode_tokens_per_s"] > 0 and f["e2e_ms"] > f["ttft_ms"]
    assert runs["ort-genai-int8"]["versions"]["onnxruntime"]

    # the peer's FP32 build generates (nearly) what ours does: different kernels, so near-ties may flip a token
    peer = json.loads((pipeline.path / "metrics/export-genai/fp32.json").read_text())
    assert peer["gen_agreement"] >= 0.75 and peer["gen_prompts"] > 0
    for precision in ("fp32", "int8-block", "int4-block"):
        m = json.loads((pipeline.path / f"metrics/evaluate/{precision}.json").read_text())
        assert 0 <= m["gen_agreement"] <= 1 and 0 <= m["gen_first_divergence"] <= m["gen_tokens"]
        if precision == "fp32":
            assert m["gen_agreement"] == 1.0 and m["gen_first_divergence"] == m["gen_tokens"]

    summary = (pipeline.path / "reports/summary.md").read_text()
    assert "### Generation: prefill + decode" in summary and "| ort-genai-int8 | ort-genai | int8 |" in summary
    assert "ort-cpu-int8-block vs ort-genai-int8:" in summary
    with open(pipeline.path / "reports/plots/generation.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(runs) * len(gen.prompt_lens) and all(float(r["decode_tokens_per_s"]) > 0 for r in rows)


@pytest.mark.slow
def test_bench_gen_bad_inputs(pipeline, tmp_path):
    assert "unknown generation run 'nope'" in error_line(run_cli(pipeline.path, "bench-gen", "--run", "nope"),
                                                         "bench-gen")
    project = clone_project(pipeline.path, tmp_path / "p")
    import shutil

    shutil.rmtree(project / "models/genai/tiny-qwen2-int4")
    line = error_line(run_cli(project, "bench-gen", "--run", "ort-genai-int4"), "bench-gen")
    assert "models/genai/tiny-qwen2-int4 not found" in line and "dvc repro" in line
    line = error_line(run_cli(project, "bench-gen", "--run", "ort-cpu-fp32", "bench.generation.prompt_lens=[500]"),
                      "bench-gen")
    assert "prompt of 500 tokens + max_new_tokens" in line and "512 positions" in line
    assert not (project / "metrics/bench-gen/.ort-cpu-fp32.json.partial").exists()


@pytest.mark.slow
def test_a_static_npu_graph_says_it_cannot_generate(pipeline, monkeypatch):
    from antinet_npu.config import load
    from antinet_npu.runtime.backends.qnn_ep import QnnHtpBackend

    monkeypatch.chdir(pipeline.path)
    backend = QnnHtpBackend(load(pipeline.path / "params.yaml"), "burst")
    backend.load(pipeline.path / "models/qnn/tiny-qwen2-w8a16-s32_ctx.onnx")
    try:
        with pytest.raises(AntinetError, match="static single-pass graph of 32 tokens and cannot generate"):
            backend.stepper()
    finally:
        backend.close()


@pytest.mark.slow
def test_genai_builder_writes_the_plain_builders_bytes(pipeline, tmp_path):
    """export-genai's builder (one float copy in memory) gives exactly what onnxruntime-genai's own builder gives."""
    snapshot = pipeline.path / "models/pytorch/tiny-qwen2"
    for module in ("onnxruntime_genai.models.builder", "antinet_npu.build.genai_builder"):
        out = tmp_path / module
        subprocess.run([sys.executable, "-m", module, "-i", str(snapshot), "-o", str(out), "-p", "int4", "-e", "cpu",
                        "-c", str(out / ".cache")], check=True, capture_output=True)
    for name in ("model.onnx", "model.onnx.data"):
        plain = (tmp_path / "onnxruntime_genai.models.builder" / name).read_bytes()
        assert plain == (tmp_path / "antinet_npu.build.genai_builder" / name).read_bytes(), name
    assert plain == (pipeline.path / "models/genai/tiny-qwen2-int4" / name).read_bytes()


@pytest.mark.slow
def test_every_generation_session_resumes_from_a_snapshot_as_if_it_never_stopped(pipeline, monkeypatch):
    """The session API (prefill, extend, decode, snapshot, restore) on every backend that gives logits: a prompt
    resumed from a snapshot of its prefix, after the cache moved on, gives exactly what an uninterrupted run gives."""
    from antinet_npu.config import load
    from antinet_npu.runtime.backends.registry import open_run

    monkeypatch.chdir(pipeline.path)
    cfg = load(pipeline.path / "params.yaml")
    prompt = np.random.default_rng(0).integers(1, 2000, 45)
    tried = []
    for run, spec in cfg.bench.generation.runs.items():
        if spec.backend == "genie":  # Genie samples for itself: no logits to compare
            continue
        backend, _ = open_run(cfg, run)
        try:
            session = backend.stepper() if spec.cache else \
                generation.RecomputeStepper(backend.run, backend.stepper().context_length)
            whole = session.prefill(prompt)
            session.prefill(prompt[:37])
            straight = session.extend(prompt[37:])  # the same chunks, never interrupted
            session.prefill(prompt[:37])
            saved = session.snapshot()
            assert saved.length == 37 and saved.nbytes >= 0
            session.decode(7)  # the cache moves on past the snapshot ...
            session.restore(saved)  # ... and comes back
            assert session.length == 37
            resumed = session.extend(prompt[37:])
        finally:
            backend.close()
        assert np.array_equal(resumed, straight), run
        # against one prefill of the whole prompt: the same token (dynamic int8 scales activations per call)
        assert int(np.argmax(resumed)) == int(np.argmax(whole)), run
        tried.append(type(session).__name__)
    assert {"TorchStepper", "OrtKvStepper", "GenaiStepper", "StaticStepper", "RecomputeStepper"} <= set(tried)
