"""Stages `prepare` and `export` through `dvc repro` on the builtin model, and their bad-input errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

from antinet_npu.build.onnx_models import cpu_session, run_logits
from antinet_npu.signature import KvLayout, Signature
from conftest import TEST_OVERRIDES, clone_project, error_line

pytestmark = pytest.mark.slow


def _tree_digest(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_repro_builds_snapshot_onnx_and_metrics(pipeline):
    assert {"prepare", "export"} <= set(pipeline.first_run)
    snap = pipeline.path / "models/pytorch/tiny-qwen2"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (snap / name).is_file(), name
    onnx = pipeline.path / "models/onnx/tiny-qwen2.onnx"
    assert onnx.is_file() and (onnx.parent / "tiny-qwen2.onnx.data").is_file()
    assert not list(onnx.parent.glob(".*")), "staging leftovers"

    metrics = json.loads((pipeline.path / "metrics/export.json").read_text())
    assert metrics["max_rel_diff"] < 1e-3 and metrics["top1_equal"] >= 0.99 and metrics["max_abs_diff"] > 0
    assert metrics["opset"] == 17 and metrics["size_mb"] > 1 and metrics["export_seconds"] > 0
    assert metrics["peak_rss_mb"] > 0
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= {k for k, v in metrics["versions"].items() if v}
    prepare = json.loads((pipeline.path / "metrics/prepare.json").read_text())
    assert prepare["num_parameters"] > 1e6 and prepare["train_loss"] < 7.0  # below ln(2048) = 7.6: it learned


def test_onnx_has_a_kv_cache_and_runs_single_passes_with_an_empty_past(pipeline):
    path = pipeline.path / "models/onnx/tiny-qwen2.onnx"
    signature = Signature.read(path)
    assert signature.kv == KvLayout(num_layers=4, kv_heads=2, head_dim=32) and signature.mask == "padding"
    session = cpu_session(path)
    assert [i.name for i in session.get_inputs()] == list(signature.inputs) == [
        "input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{k}" for i in range(4)
                                                         for k in ("key", "value"))]
    assert [o.name for o in session.get_outputs()][:3] == ["logits", "present.0.key", "present.0.value"]
    for batch, seq in ((1, 5), (3, 37)):
        logits = run_logits(session, signature, np.ones((batch, seq), dtype=np.int64))
        assert logits.shape == (batch, seq, 2048)
    metrics = json.loads((pipeline.path / "metrics/export.json").read_text())
    assert metrics["kv_cache"] and metrics["greedy_prompts_equal"] == 3 and metrics["greedy_new_tokens"] == 32
    # attention reshapes with constant shapes: no shape arithmetic left to run in every layer at every step
    graph = onnx.load(path, load_external_data=False).graph
    assert [n.name for n in graph.node if "/self_attn/" in n.name and n.op_type in ("Shape", "Gather")] == []


def test_fp32_greedy_generation_equals_pytorch_generate(pipeline):
    """Token for token, on held-out prompts, through the cache; and equal to re-running the whole prefix."""
    import torch

    from antinet_npu.build import checkpoint, corpus
    from antinet_npu.config import load
    from antinet_npu.runtime import generation

    cfg = load(pipeline.path / "params.yaml")
    snapshot = pipeline.path / "models/pytorch/tiny-qwen2"
    model = checkpoint.load_snapshot(snapshot)
    model.generation_config.eos_token_id = None
    docs = corpus.split_documents(cfg.text)["eval"]
    prompts = corpus.windows(checkpoint.load_text_tokenizer(snapshot), docs[1:], 24, 3, "evaluation")
    path = pipeline.path / "models/onnx/tiny-qwen2.onnx"
    session, signature = cpu_session(path), Signature.read(path)
    cached = generation.OrtKvStepper(session, signature)
    recompute = generation.RecomputeStepper(lambda ids: run_logits(session, signature, ids), 512)
    for prompt in prompts:
        ids = torch.from_numpy(prompt[None])
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                      pad_token_id=0)[0, 24:].tolist()
        assert list(generation.generate(cached, prompt, 32)) == expected
        assert list(generation.generate(recompute, prompt, 32)) == expected


def test_second_repro_runs_nothing_and_opset_change_reruns_export_only(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    from conftest import reproduce, run_cli

    assert reproduce(project) == []
    run_cli(project, "compose", "--write", *TEST_OVERRIDES, "export.opset=18", check=True)
    stale = reproduce(project, dry=True)
    assert "export" in stale and "prepare" not in stale
    assert reproduce(project, "export", single_item=True) == ["export"]
    assert json.loads((project / "metrics/export.json").read_text())["opset"] == 18
    # The new graph makes everything downstream of export stale, and nothing upstream.
    stale = {s.split("@")[0] for s in reproduce(project, dry=True)}
    assert {"quantize", "evaluate", "bench"} <= stale and not stale & {"prepare", "export-npu", "compile"}


def test_prepare_is_byte_identical_so_downstream_stays_cached(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    from conftest import reproduce

    before = _tree_digest(project / "models/pytorch/tiny-qwen2")
    assert reproduce(project, "prepare", force=True) == ["prepare"]
    assert _tree_digest(project / "models/pytorch/tiny-qwen2") == before
    assert reproduce(project) == []  # export's input did not change


def _assert_clean_failure(proc, expected: str, project) -> None:
    assert expected in error_line(proc, "prepare")
    models = project.path / "models"
    assert not models.exists() or not any(p.name.endswith(".partial") for p in models.rglob("*"))


def test_missing_local_directory(project, tmp_path):
    proc = project.cli("prepare", f"model.source={tmp_path}/nowhere")
    _assert_clean_failure(proc, "is not a directory: point model.source at a local", project)
    assert not (project.path / "models/pytorch/tiny-qwen2").exists()


def test_missing_real_model_says_how_to_build_it(project, tmp_path):
    proc = project.cli("prepare", "model=smollm2-135m", f"model.source={tmp_path}/smollm2")
    _assert_clean_failure(proc, "model smollm2-135m: no checkpoint at", project)
    assert "make real-model" in proc.stderr and "tools/real-model.sh" in proc.stderr


def test_directory_without_config_json(project, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = project.cli("prepare", f"model.source={tmp_path}/empty")
    _assert_clean_failure(proc, "has no config.json", project)


def test_hub_id_not_cached_without_network(project):
    proc = project.cli("prepare", "model=qwen2-1.5b")
    _assert_clean_failure(proc, "'Qwen/Qwen2-1.5B' is not in the local Hugging Face cache", project)
    assert not (project.path / "models/pytorch/qwen2-1.5b").exists()


def test_checkpoint_that_is_not_a_causal_lm(project, tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=100).save_pretrained(tmp_path / "t5")
    proc = project.cli("prepare", f"model.source={tmp_path}/t5")
    _assert_clean_failure(proc, "is a 't5' model, not a causal LM", project)


def test_unknown_group_option_and_key(project):
    proc = project.cli("prepare", "model=qwen9")
    _assert_clean_failure(proc, "no option 'qwen9' in group 'model'", project)
    proc = project.cli("prepare", "+model.flavour=x")
    _assert_clean_failure(proc, "unknown key 'model.flavour'", project)


def test_local_directory_source_round_trips(pipeline, tmp_path):
    # A prepared snapshot is itself a valid local checkpoint: prepare it again under another name.
    project = clone_project(pipeline.path, tmp_path / "p")
    from conftest import run_cli

    src = project / "models/pytorch/tiny-qwen2"
    proc = run_cli(project, "prepare", f"model.source={src}", "model.name=local-copy", "model.builtin=null")
    assert proc.returncode == 0, proc.stderr
    assert _tree_digest(project / "models/pytorch/local-copy")["model.safetensors"] == \
        _tree_digest(src)["model.safetensors"]
