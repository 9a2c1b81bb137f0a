"""Stages `export-npu` and `compile`: real QNN context binaries, run for real on the HTP backend (emulator here)."""

from __future__ import annotations

import json
import os
import platform

import onnx
import pytest
from onnx import TensorProto, helper

from antinet_npu import AntinetError
from antinet_npu.build import qnn
from antinet_npu.config import TargetConfig
from conftest import clone_project, error_line, run_cli

pytestmark = pytest.mark.slow


def _metrics(project, name):
    return json.loads((project / "metrics/compile" / f"{name}.json").read_text())


def test_repro_compiles_context_binaries_that_match_fp32(pipeline):
    assert {"export-npu@32", "compile@w8a16-32", "compile@w8a8-32"} <= set(pipeline.first_run)
    for precision in ("w8a16", "w8a8"):
        ctx = pipeline.path / f"models/qnn/tiny-qwen2-{precision}-s32_ctx.onnx"
        binary = ctx.with_name(f"tiny-qwen2-{precision}-s32_ctx_qnn.bin")
        assert ctx.is_file() and binary.stat().st_size > 1e6
        assert qnn.context_binaries(ctx) == [binary]
        m = _metrics(pipeline.path, f"{precision}-32")
        assert m["cpu_compute_nodes"] == 0 and m["qnn_node_fraction"] == 1.0 and m["context_nodes"] >= 1
        assert m["gate_passed"] is True and m["backend"] == "qnn-htp"
        assert m["emulated"] is (platform.machine().lower() in ("x86_64", "amd64"))
        assert m["versions"]["qnn"] and m["versions"]["onnxruntime_qnn"] and m["soc_model"] == 60
    assert _metrics(pipeline.path, "w8a16-32")["cosine"] >= 0.999


def test_context_runs_on_htp_and_accepts_only_its_static_shape(pipeline):
    import numpy as np

    from antinet_npu.signature import Signature, causal_mask

    ctx = pipeline.path / "models/qnn/tiny-qwen2-w8a16-s32_ctx.onnx"
    signature = Signature.read(ctx)  # written by compile: what the context takes, without parsing its name
    assert (signature.seq_len, signature.mask, signature.kv, signature.can_generate) == (32, "additive", None, False)
    session = qnn.session(ctx, TargetConfig(), allow_cpu_fallback=False)
    logits = session.run(None, signature.static_feeds(np.arange(32)[None]))[0]
    assert logits.shape == (1, 32, 2048) and np.isfinite(logits).all()
    with pytest.raises(AntinetError, match="exactly 32 tokens"):
        signature.static_feeds(np.arange(16)[None])
    feeds = {"input_ids": np.arange(16)[None], "attention_mask": causal_mask(16, signature.mask_value),
             "position_ids": np.arange(16)[None]}
    with pytest.raises(Exception):
        session.run(None, feeds)


def test_recompiling_over_an_existing_context_replaces_it(pipeline, tmp_path):
    # The EP refuses to overwrite a ctx file; the stage compiles into a fresh staging folder instead.
    project = clone_project(pipeline.path, tmp_path / "p")
    binary = project / "models/qnn/tiny-qwen2-w8a16-s32_ctx_qnn.bin"
    before = binary.stat().st_mtime_ns
    proc = run_cli(project, "compile", "--precision", "w8a16", "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    assert binary.stat().st_mtime_ns != before
    assert not list((project / "models/qnn").glob(".*"))


def test_op_rejected_by_htp_is_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                               helper.make_node("Erf", ["r"], ["y"], name="odd_erf")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with pytest.raises(AntinetError, match=r"would run on CPU, e.g. 'odd_erf' \(op Erf\)"):
        qnn.compile_context(tmp_path / "m.onnx", tmp_path / "m_ctx.onnx", TargetConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no probe or partial context left


def test_missing_onnxruntime_qnn(pipeline, tmp_path):
    blocker = tmp_path / "block" / "onnxruntime_qnn"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block")}
    proc = subprocess.run([sys.executable, "-m", "antinet_npu", "compile", "--precision", "w8a16", "--seq-len", "32"],
                          cwd=pipeline.path, env=env, capture_output=True, text=True)
    assert "onnxruntime-qnn is not installed: install the qnn extra" in error_line(proc, "compile")


def test_sequence_longer_than_max_positions(pipeline):
    line = error_line(run_cli(pipeline.path, "export-npu", "--seq-len", "1024"), "export-npu")
    assert "sequence length 1024 exceeds the model's maximum positions (512)" in line
    line = error_line(run_cli(pipeline.path, "compile", "--precision", "w8a16", "--seq-len", "1024"), "compile")
    assert "exceeds the model's maximum positions" in line


def test_unknown_npu_precision_and_missing_static_graph(pipeline):
    line = error_line(run_cli(pipeline.path, "compile", "--precision", "w4a4", "--seq-len", "32"), "compile")
    assert "unknown NPU precision 'w4a4': valid ones are w8a16, w8a16-mixed, w4a16, w8a8 (or add" in line
    line = error_line(run_cli(pipeline.path, "compile", "--precision", "fp16", "--seq-len", "32"), "compile")
    assert "'fp16' (method fp16) builds the generation parts only: `antinet-npu compile-gen --precision fp16`" in line
    line = error_line(run_cli(pipeline.path, "compile", "--precision", "w8a16", "--seq-len", "64"), "compile")
    assert "tiny-qwen2-s64.onnx not found: run `dvc repro export-npu@64` first" in line
