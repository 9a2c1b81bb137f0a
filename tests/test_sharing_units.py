"""The sharing pieces without a remote: outputs read from dvc.lock, which output holds a path, device names."""

from __future__ import annotations

from pathlib import Path

import pytest

from antinet_npu import AntinetError, metrics, sharing

LOCK = """\
schema: '2.0'
stages:
  prepare:
    cmd: antinet-npu prepare
    outs:
    - path: metrics/prepare.json
      hash: md5
      md5: 4df089dfe51d929180326745a1960685
    - path: models/pytorch/tiny-qwen2
      hash: md5
      md5: bd041d5c18d66d738e7f1355b4d0e9df.dir
  quantize@int8-block:
    cmd: antinet-npu quantize --precision int8-block
    outs:
    - path: models/onnx/tiny-qwen2-int8-block.onnx
      hash: md5
      md5: 7b1a48d0ea1eac580b912637cd90a2cd
"""


def test_outputs_come_from_dvc_lock_and_a_path_inside_a_folder_belongs_to_it(tmp_path):
    (tmp_path / "dvc.lock").write_text(LOCK)
    outputs = sharing.locked_outputs(tmp_path / "dvc.lock")
    folder, inside = sharing.owner("models/pytorch/tiny-qwen2/tokenizer.json", outputs)
    assert (folder.stage, folder.is_dir, inside) == ("prepare", True, "tokenizer.json")
    single, inside = sharing.owner("models/onnx/tiny-qwen2-int8-block.onnx", outputs)
    assert (single.stage, single.is_dir, inside) == ("quantize@int8-block", False, "")
    with pytest.raises(AntinetError, match="not an output in dvc.lock at this commit"):
        sharing.owner("models/onnx/tiny-qwen2-int4-block.onnx", outputs)


def test_a_commit_without_dvc_lock_is_one_line(tmp_path):
    with pytest.raises(AntinetError, match="dvc.lock not found: this commit has no built pipeline"):
        sharing.locked_outputs(tmp_path / "dvc.lock")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "bad name"])
def test_a_device_name_is_one_folder_name(name):
    with pytest.raises(AntinetError, match="must be one folder name"):
        metrics.device_root(name)


def test_device_metrics_go_under_metrics_devices():
    assert metrics.device_root(None) == Path("metrics")
    assert metrics.device_root("x-elite_laptop.2") == Path("metrics/devices/x-elite_laptop.2")
    assert metrics.BENCH.path("r", metrics.device_root("d")) == Path("metrics/devices/d/bench/r.json")
