"""Stage `sensitivity` and the mixed recipes that read it, on the builtin model; the pieces they are made of."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from antinet_npu import AntinetError
from antinet_npu.build import quantization, sensitivity
from antinet_npu.config import MixedConfig, ProbeConfig
from antinet_npu.measure import fidelity
from conftest import clone_project, error_line, run_cli

LAYERS = 4  # tiny-qwen2


def _metrics(project: Path, name: str) -> dict:
    return json.loads((project / "metrics" / f"{name}.json").read_text())


@pytest.mark.parametrize("name, group", [
    ("model.layers.3.self_attn.o_proj", "layer03.attn"),
    ("/model/model/layers.12/self_attn/k_proj/MatMul", "layer12.attn"),
    ("model.layers.0.mlp.gate_proj", "layer00.mlp_in"),
    ("/model/model/layers.7/mlp/up_proj/MatMul", "layer07.mlp_in"),
    ("/model/model/layers.7/mlp/down_proj/MatMul", "layer07.mlp_out"),
    ("lm_head", "lm_head"), ("/model/lm_head/MatMul", "lm_head"),
    ("model.embed_tokens", "embedding"), ("/model/model/embed_tokens/Gather", "embedding"),
    ("/model/model/layers.7/self_attn/MatMul_1", None), ("model.norm", None),
])
def test_group_of_names_torch_modules_and_onnx_nodes_alike(name, group):
    assert sensitivity.group_of(name) == group


def test_fake_quant_granularities():
    x = torch.linspace(-1, 1, 64).reshape(2, 32) * torch.tensor([[1.0], [100.0]])
    for granularity in ("block", "channel", "tensor"):
        y = sensitivity.fake_quant(x, 8, granularity, block_size=16)
        assert y.shape == x.shape
    # per channel: the small row keeps its resolution; one scale for the tensor crushes it
    per_row = (sensitivity.fake_quant(x, 8, "channel") - x)[0].abs().max()
    per_tensor = (sensitivity.fake_quant(x, 8, "tensor") - x)[0].abs().max()
    assert per_row < per_tensor / 10
    assert torch.equal(sensitivity.fake_quant(x, 16, "block", 32, symmetric=False).sign(), x.sign())


def test_fake_quant_float_zero_keeps_a_q4_1_grid():
    """Weights on llama.cpp's Q4_1 grid (per block of 32: a scale and a float minimum) come back exactly with a float
    zero (compile's block_offsets); an integer zero point or a symmetric grid re-rounds them."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 16, (8, 64), generator=g).float()
    levels[:, 0], levels[:, 32], levels[:, 1], levels[:, 33] = 0, 0, 15, 15  # min-max: both ends in every block
    w = levels * torch.rand(8, 1, generator=g) * 0.1 + torch.rand(8, 1, generator=g) - 1.2
    exact = sensitivity.fake_quant(w, 4, "block", 32, symmetric=False, float_zero=True)
    assert torch.allclose(exact, w, rtol=0, atol=1e-6 * w.abs().max())
    for other in (dict(symmetric=False), dict(symmetric=True)):
        assert (sensitivity.fake_quant(w, 4, "block", 32, **other) - w).abs().max() > 1e-3 * w.abs().max()


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    meter = fidelity.FidelityMeter()
    for _ in range(16):
        ids = rng.integers(0, 50, size=(1, 32))
        ref = rng.standard_normal((1, 32, 50)).astype(np.float32)
        meter.add(ref, ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32), ids)
    m = meter.result()
    assert m["ppl_increase_ci_low"] < m["ppl_increase"] < m["ppl_increase_ci_high"]
    assert m["top1_ci_low"] <= m["top1_agreement"] <= m["top1_ci_high"]
    assert "95 % CI" in fidelity.interval_text(m)


def test_damage_is_kl_and_top1_as_defined():
    """KL as negative entropy minus cross-entropy (one batched product per group) equals sum p (log p - log q)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(3 * torch.randn(2, 7, 500, generator=g, dtype=torch.float64), -1)
    var = torch.log_softmax(ref + 0.05 * torch.randn(2, 7, 500, generator=g, dtype=torch.float64), -1)
    kl, top1 = sensitivity._damage(sensitivity._Reference(ref), var)
    assert kl == pytest.approx(float((ref.exp() * (ref - var)).sum(-1).mean()), rel=1e-9) and kl > 0
    assert top1 == float((var.argmax(-1) == ref.argmax(-1)).double().mean())
    assert sensitivity._damage(sensitivity._Reference(ref), ref) == (0.0, 1.0)


def test_a_group_replays_the_layers_before_it_and_measures_the_same():
    """Quantizing a group in layer L changes nothing before it: those layers' float outputs are recorded once and
    replayed, not computed again, and every group's damage is the same as with the whole model run."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    windows = np.random.default_rng(0).integers(0, 64, (5, 16))
    probe = ProbeConfig(weight_bits=4, activation_bits=8)
    computed = [0, 0, 0]
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: computed.__setitem__(i, computed[i] + 1))
    replayed = sensitivity.measure(model, "m", windows, "p", probe, batch=2)
    batches, groups = 3, 3 * 3 + 2  # 5 windows by 2; per layer attn, mlp_in, mlp_out; lm_head, embedding
    # the float run, the embedding's run, and the runs of the groups of this layer and those before it
    assert computed == [(2 + 3 * (i + 1)) * batches for i in range(3)]
    computed[:] = [0, 0, 0]
    whole = sensitivity.measure(model, "m", windows, "p", probe, batch=2, replay_prefix=False)
    assert computed == [(1 + groups) * batches] * 3
    assert [g.group for g in replayed.groups] == [g.group for g in whole.groups] and len(whole.groups) == groups
    for a, b in zip(replayed.groups, whole.groups):
        assert a.kl == pytest.approx(b.kl, rel=1e-9, abs=1e-15) and a.top1_agreement == b.top1_agreement


@pytest.mark.slow
def test_repro_measures_every_group_and_ranks_them(pipeline):
    probes = ("int8-block", "w8a16", "w4a16")
    assert {f"sensitivity@{probe}" for probe in probes} <= set(pipeline.first_run)
    for probe in probes:
        m = _metrics(pipeline.path, f"sensitivity/{probe}")
        assert m["model"] == "tiny-qwen2" and m["probe"] == probe and m["num_groups"] == 3 * LAYERS + 2
        assert sorted(g["rank"] for g in m["groups"].values()) == list(range(1, m["num_groups"] + 1))
        assert all(g["kl"] >= 0 and 0 <= g["top1_agreement"] <= 1 for g in m["groups"].values())
        assert m["peak_rss_mb"] > 0 and m["versions"]["torch"]
    # static 16-bit activations (the NPU probe) are also judged site by site
    assert set(_metrics(pipeline.path, "sensitivity/w8a16")["activations"]) == set(sensitivity.ACTIVATION_SITES)
    rows = (pipeline.path / "reports/plots/sensitivity.csv").read_text().splitlines()
    assert rows[0] == "probe,group,rank,kl,top1_agreement" and len(rows) == 1 + len(probes) * (3 * LAYERS + 2)


@pytest.mark.slow
def test_mixed_recipes_keep_the_top_ranked_groups(pipeline):
    ranking = _metrics(pipeline.path, "sensitivity/int8-block")["groups"]
    q = _metrics(pipeline.path, "quantize/int8-mixed")
    kept = q["kept_groups"].split(",")
    assert q["mixed_probe"] == "int8-block" and q["mixed_keep_as"] == "float" and q["kept_nodes"] >= len(kept)
    # the top of the ranking among the groups MatMulNBits quantizes (not the embedding's Gather)
    candidates = sorted((g["rank"], name) for name, g in ranking.items() if name != "embedding")
    assert kept == [name for _, name in candidates[:len(kept)]]
    m = _metrics(pipeline.path, "evaluate/int8-mixed")
    assert m["gate_passed"] and m["samples"] == 8 * len(m["domains"]) and "ppl_increase_ci_high" in m
    c = _metrics(pipeline.path, "compile/w8a16-mixed-32")
    assert c["kept_groups"] and c["cpu_compute_nodes"] == 0 and c["gate_passed"]
    summary = (pipeline.path / "reports/summary.md").read_text()
    assert "Layer-group sensitivity" in summary and "| CPU int8-mixed | int8-block | float |" in summary


@pytest.mark.slow
def test_residual_stream_is_found_by_structure(pipeline):
    nodes = quantization.residual_nodes(pipeline.path / "models/npu/tiny-qwen2-s32.onnx")
    adds = [n for n in nodes if n.endswith(("/Add", "/Add_1"))]
    assert len(adds) == 2 * LAYERS  # after attention and after the MLP, per layer
    # every norm after the first (which reads the embedding): post-attention, the next layers' and the final one
    assert sum("SimplifiedLayerNormalization" in n for n in nodes) == 2 * LAYERS


@pytest.mark.slow
def test_missing_or_foreign_sensitivity_is_one_clear_line(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    path = project / "metrics/sensitivity/int8-block.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "model": "other-model"}))
    line = error_line(run_cli(project, "quantize", "--precision", "int8-mixed"), "quantize")
    assert "measured on other-model, not tiny-qwen2" in line and "dvc repro sensitivity@int8-block" in line
    path.write_text("{not json")
    line = error_line(run_cli(project, "quantize", "--precision", "int8-mixed"), "quantize")
    assert "is damaged" in line and "sensitivity@int8-block" in line
    path.unlink()
    line = error_line(run_cli(project, "quantize", "--precision", "int8-mixed"), "quantize")
    assert "not found" in line and "sensitivity@int8-block" in line


@pytest.mark.slow
def test_mixed_probe_must_exist(project):
    proc = run_cli(project.path, "quantize", "--precision", "int8-mixed",
                   "quantize.recipes.int8-mixed.mixed.probe=nope")
    assert "mixed.probe 'nope' is not a key of sensitivity.probes" in error_line(proc, "quantize")


def test_kept_groups_without_mixing_is_empty():
    assert sensitivity.kept_groups(None, "m", ["lm_head"]) == []
    assert sensitivity.kept_groups(MixedConfig(probe="p", keep=0), "m", ["lm_head"]) == []
    with pytest.raises(AntinetError, match="power of 2"):
        MixedConfig(probe="p", keep=1, keep_as="8bit", block_size=24).check(("8bit",))
    with pytest.raises(AntinetError, match="weight_granularity"):
        ProbeConfig(weight_granularity="row").check()
