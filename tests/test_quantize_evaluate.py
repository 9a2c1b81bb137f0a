"""Stages `quantize` and `evaluate` on the builtin model: real sizes, real fidelity, gates that catch damage."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from antinet_npu.build.onnx_models import save
from conftest import TEST_OVERRIDES, clone_project, error_line, reproduce, run_cli

pytestmark = pytest.mark.slow
PRECISIONS = ["fp16", "int8-dynamic", "int8-block", "int8-smooth", "int8-mixed", "int4-block"]


def _metrics(project, kind, precision):
    return json.loads((project / "metrics" / kind / f"{precision}.json").read_text())


def test_repro_builds_six_variants_and_seven_evaluations(pipeline):
    assert {f"quantize@{p}" for p in PRECISIONS} | {f"evaluate@{p}" for p in ["fp32", *PRECISIONS]} <= \
        set(pipeline.first_run)
    for p in PRECISIONS:
        assert (pipeline.path / f"models/onnx/tiny-qwen2-{p}.onnx").is_file()
        q = _metrics(pipeline.path, "quantize", p)
        assert q["size_mb"] > 0 and q["seconds"] >= 0 and q["peak_rss_mb"] > 0 and q["versions"]["onnxruntime"]
        assert q["wall_seconds"] >= q["seconds"]  # the stage process, its imports and loading included
    for p in ["fp32", *PRECISIONS]:
        m = _metrics(pipeline.path, "evaluate", p)
        for key in ("top1_agreement", "cosine", "kl", "max_abs_error", "perplexity", "perplexity_fp32",
                    "ppl_increase", "size_mb", "gate_passed", "backend", "device", "emulated"):
            assert key in m, key
        assert m["gate_passed"] is True and m["emulated"] is False


def test_reference_is_exact_and_perplexity_is_meaningful(pipeline):
    m = _metrics(pipeline.path, "evaluate", "fp32")
    assert m["top1_agreement"] == 1.0 and m["kl"] == 0.0 and m["max_abs_error"] == 0.0
    # A trained model predicts held-out text far better than uniform guessing over its 2048-token vocabulary.
    assert m["perplexity"] < 2048 / 2


def test_fp16_agrees_with_fp32(pipeline):
    m = _metrics(pipeline.path, "evaluate", "fp16")
    assert m["top1_agreement"] >= 0.99 and m["cosine"] >= 0.9999


def test_int8_files_are_under_four_tenths_of_fp32(pipeline):
    for p in ("int8-dynamic", "int8-block", "int8-smooth"):
        assert _metrics(pipeline.path, "quantize", p)["size_ratio"] < 0.4, p
    assert _metrics(pipeline.path, "quantize", "int4-block")["size_ratio"] < \
        _metrics(pipeline.path, "quantize", "int8-block")["size_ratio"]


def test_smoothing_changes_the_numbers_not_the_graph(pipeline):
    """int8-smooth is int8-block's graph (same nodes, same bytes: same speed) with rescaled weights and gains."""
    block, smooth = (_metrics(pipeline.path, "quantize", p) for p in ("int8-block", "int8-smooth"))
    assert smooth["smooth_alpha"] == 0.5 and smooth["smooth_samples"] >= 1 and "smooth_alpha" not in block
    assert smooth["quantized_ops"] == block["quantized_ops"] and smooth["size_mb"] == pytest.approx(block["size_mb"])
    graphs = [onnx.load(pipeline.path / f"models/onnx/tiny-qwen2-{p}.onnx", load_external_data=False)
              for p in ("int8-block", "int8-smooth")]
    assert [n.op_type for n in graphs[0].graph.node] == [n.op_type for n in graphs[1].graph.node]
    assert _metrics(pipeline.path, "evaluate", "int8-smooth")["gate_passed"]


def _damage(path, factor):
    """Scale every block-quantization scale of a MatMulNBits model: a plausible but broken variant."""
    model = onnx.load(path)
    for init in model.graph.initializer:
        if "_scales" in init.name:  # q/k/v and gate/up merged: `..._scales_fused`
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    save(model, path)


def test_damaged_variant_fails_the_gate(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    _damage(project / "models/onnx/tiny-qwen2-int8-block.onnx", 1.5)
    proc = run_cli(project, "evaluate", "--precision", "int8-block")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "fidelity gate: int8-block on main: top1_agreement" in last and "is not >= 0.95" in last, last
    assert _metrics(project, "evaluate", "int8-block")["gate_passed"] is False

    proc = run_cli(project, "evaluate", "--precision", "int8-block", *TEST_OVERRIDES, "evaluate.mode=warn")
    assert proc.returncode == 0 and "fidelity gate: int8-block" in proc.stderr


def test_params_change_reruns_only_that_variant(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    before = _metrics(project, "quantize", "int8-dynamic")
    change = ["quantize.recipes.int8-dynamic.weight_type=QInt8", "quantize.recipes.int8-dynamic.per_channel=true"]
    run_cli(project, "compose", "--write", *TEST_OVERRIDES, *change, check=True)
    assert reproduce(project) == ["bench-gen@ort-cpu-int8-dynamic", "bench@ort-cpu-int8-dynamic-128",
                                  "bench@ort-cpu-int8-dynamic-32", "evaluate@int8-dynamic", "quantize@int8-dynamic",
                                  "report"]
    after = _metrics(project, "quantize", "int8-dynamic")
    assert (before["weight_type"], after["weight_type"]) == ("QUInt8", "QInt8") and after["per_channel"] is True
    # An evaluate-only key makes every evaluation stale, and nothing else.
    run_cli(project, "compose", "--write", *TEST_OVERRIDES, *change, "evaluate.num_samples=4", check=True)
    assert reproduce(project, dry=True) == [f"evaluate@{p}" for p in sorted(["fp32", *PRECISIONS])]


def test_unknown_precision(pipeline):
    line = error_line(run_cli(pipeline.path, "quantize", "--precision", "int3"), "quantize")
    assert ("unknown precision 'int3': valid ones are fp16, int8-dynamic, int8-block, int8-smooth, int8-mixed, "
            "int4-block") in line
    line = error_line(run_cli(pipeline.path, "quantize", "--precision", "fp16", "quantize.precisions=[fp8]"),
                       "quantize")
    assert "unknown precision 'fp8'" in line


def test_missing_and_empty_text_source(pipeline, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("\n\n")
    for source, expected in ((tmp_path / "nope", "does not exist"), (tmp_path / "empty", "holds no text")):
        line = error_line(run_cli(pipeline.path, "evaluate", "--precision", "fp16", f"text.source={source}"),
                           "evaluate")
        assert expected in line


def test_sample_length_beyond_max_positions(pipeline):
    line = error_line(run_cli(pipeline.path, "evaluate", "--precision", "fp16", "evaluate.seq_len=4096"),
                       "evaluate")
    assert "exceeds the model's maximum positions (512)" in line


def test_corrupt_or_missing_input_onnx(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    (project / "models/onnx/tiny-qwen2.onnx").write_bytes(b"not a protobuf")
    line = error_line(run_cli(project, "quantize", "--precision", "int8-block"), "quantize")
    assert "is not a valid ONNX model" in line
    assert not list((project / "models/onnx").glob(".*"))
    (project / "models/onnx/tiny-qwen2.onnx").unlink()
    line = error_line(run_cli(project, "quantize", "--precision", "int8-block"), "quantize")
    assert "not found: run the stage that builds it" in line


def test_evaluate_without_greedy_prompts(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    proc = run_cli(project, "evaluate", "--precision", "int8-block", "evaluate.gen_prompts=0")
    assert proc.returncode == 0 and "no greedy check" in proc.stderr, proc.stderr[-2000:]
    m = _metrics(project, "evaluate", "int8-block")
    assert m["gen_prompts"] == 0 and "gen_agreement" not in m and m["gate_passed"]
