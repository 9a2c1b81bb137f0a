"""The config tree: params.yaml is exactly conf/ composed; bad keys and values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from antinet_npu import AntinetError, config
from conftest import ROOT


def test_params_yaml_is_the_composition_of_conf(tmp_path):
    # The same function `dvc exp run` uses: params.yaml must be byte-identical to what DVC would write.
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), [])
    assert (ROOT / "params.yaml").read_text() == out.read_text(), "run `antinet-npu compose --write` and commit"


@pytest.mark.parametrize("model", sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")))
def test_every_model_option_composes_and_validates(model):
    cfg = config.validate(config.compose([f"model={model}"], ROOT / "conf"), source=model)
    assert cfg.model.name == model


def test_a_model_file_tunes_other_groups_and_the_command_line_wins():
    shape = config.validate(config.compose(["model=qwen2-1.5b-shape"], ROOT / "conf"), source="shape")
    assert shape.compile.precisions == [] and all(r.backend in ("torch", "ort-cpu") for r in shape.bench.runs.values())
    back = config.compose(["model=qwen2-1.5b-shape", "bench/runs=default"], ROOT / "conf")
    assert "qnn-htp-w8a16-128" in back.bench.runs
    real = config.validate(config.compose(["model=smollm2-135m"], ROOT / "conf"), source="smollm2")
    assert real.evaluate.gate_mode("int8-dynamic") == "warn" and real.evaluate.gate_mode("int8-mixed") == "fail"
    gate = real.evaluate.gate("int8-mixed")
    assert gate.max_ppl_increase == 0.01 and gate.min_top1 == 0.97


def test_default_config_is_the_builtin_model():
    cfg = config.load(ROOT / "params.yaml")
    assert cfg.model.source == "builtin:tiny-qwen2" and cfg.model.is_builtin
    assert 64 <= cfg.model.builtin.hidden_size <= 256


def _params(tmp_path: Path, edit) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["export"].update(opsett=18), "unknown key 'export.opsett' (valid keys under 'export': opset,"),
    (lambda d: d.update(exprt={}), "unknown key 'exprt'"),
    (lambda d: d["export"].update(opset="seventeen"), "bad value for 'export.opset'"),
    (lambda d: d["export"].update(opset=99), "export.opset must be between 14 and 21, got 99"),
    (lambda d: d["model"].update(name="a/b"), "model.name 'a/b' must be a plain file name"),
    (lambda d: d["model"].update(builtin=None), "model.builtin is not set"),
    (lambda d: d["model"].pop("source"), "required key 'model.source' is not set"),
    (lambda d: d["quantize"]["recipes"]["int8-smooth"]["smooth"].update(alpha=1.5),
     "quantize.recipes.int8-smooth: smooth.alpha must be between 0 and 1 (exclusive), got 1.5"),
    (lambda d: d["quantize"]["recipes"]["fp16"].update(smooth={"alpha": 0.5}),
     "quantize.recipes.fp16: smooth needs a matmul-nbits recipe"),
    (lambda d: d["compile"]["recipes"]["w4a16"].update(activation_type="QInt4"),
     "activation_type must be one of QUInt8, QInt8, QUInt16, QInt16, got 'QInt4'"),
    (lambda d: d["compile"]["recipes"]["w4a16"].update(per_channel=False),
     "weight_type QInt4 is per output channel: set per_channel true"),
    (lambda d: d["compile"]["recipes"]["w8a16"].update(block_size=32),
     "block_size 32 is for weight_type QInt4 (0: per channel)"),
    (lambda d: d["compile"]["recipes"]["w4a16"].update(block_size=0),
     "block_offsets needs block_size > 0 (offsets per block)"),
    (lambda d: d["sensitivity"]["probes"]["w4a16"].update(weight_zero="half"),
     "weight_zero must be integer or float, got 'half'"),
    (lambda d: d["compile"]["recipes"]["w4a16"].update(verify_samples=0), "verify_samples must be null or > 0, got 0"),
    (lambda d: d["genie"].update(precisions=["w8a16", "w8a8"]),
     "genie.precisions lists 'w8a8', which compile.generation.precisions does not build"),
])
def test_bad_params_are_one_line_errors(tmp_path, edit, expected):
    with pytest.raises(AntinetError) as err:
        config.load(_params(tmp_path, edit))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(AntinetError, match=r"no option 'qwen9' in group 'model' \(choose one of: .*tiny-qwen2"):
        config.compose(["model=qwen9"], ROOT / "conf")


def test_override_of_unknown_key_is_an_error():
    with pytest.raises(AntinetError, match="export.opsett"):
        config.compose(["export.opsett=3"], ROOT / "conf")


@pytest.mark.parametrize("group", ["bench/runs=default", "bench/runs=cpu"])
def test_the_run_lists_name_the_artifacts_that_artifacts_py_names(group):
    """conf/ spells each run's paths for DVC (deps must be literal); `artifacts.run_artifact` decides them."""
    from antinet_npu import artifacts
    from antinet_npu.runtime.backends.registry import SPECS

    cfg = config.validate(config.compose([group], ROOT / "conf"), source=group)
    runs = [*((SPECS[r.backend].single_pass, r) for r in cfg.bench.runs.values()),
            *((SPECS[r.backend].generation, r) for r in cfg.bench.generation.runs.values())]
    assert runs
    for what, run in runs:
        model, weights = artifacts.run_artifact(cfg.model.name, what, run.precision, getattr(run, "seq_len", None))
        assert (artifacts.MODELS / run.model, artifacts.MODELS / run.weights) == (model, weights), run
