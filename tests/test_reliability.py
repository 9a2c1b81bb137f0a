"""Damaged inputs, interrupted stages, masked failures: one line naming the problem and the fix, nothing left behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import yaml

from conftest import ROOT, clone_project, error_line, run_cli


def test_committed_dvc_lock_matches_the_committed_code():
    """`dvc status` on the committed tree would show the stage stale: the lock must record the files' current md5."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split())
    stale = []
    for stage, entry in lock["stages"].items():
        for dep in entry.get("deps", []):
            path = dep["path"]
            if path in tracked and not dep.get("md5", "").endswith(".dir"):
                if hashlib.md5((ROOT / path).read_bytes()).hexdigest() != dep["md5"]:
                    stale.append(f"{stage}: {path}")
    assert not stale, f"dvc.lock is older than these files (run `dvc repro` and commit dvc.lock): {stale}"


def test_corpus_windows_reject_nonsense_lengths():
    from antinet_npu import AntinetError
    from antinet_npu.build import corpus

    with pytest.raises(AntinetError, match="length >= 1 and a count >= 0, got 0 and 1"):
        corpus.windows(None, [], 0, 1, "evaluation")


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    from antinet_npu import artifacts

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".staging-{dead.pid}-abc").mkdir()
    (tmp_path / f".staging-{os.getpid()}-live").mkdir()  # a live process's: kept
    with artifacts.staged_files(tmp_path) as tmp:
        (tmp / "out.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".staging-{os.getpid()}-live", "out.txt"]


@pytest.mark.slow
def test_damaged_inputs_give_one_line(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    # a truncated safetensors file
    copy = tmp_path / "ckpt"
    shutil.copytree(project / "models/pytorch/tiny-qwen2", copy)
    weights = copy / "model.safetensors"
    weights.chmod(0o644)
    os.truncate(weights, weights.stat().st_size // 2)
    line = error_line(run_cli(project, "prepare", f"model.source={copy}"), "prepare")
    assert "the checkpoint is damaged or incomplete" in line
    # a checkpoint without its tokenizer
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(project / "models/pytorch/tiny-qwen2" / name, bare / name)
    line = error_line(run_cli(project, "prepare", f"model.source={bare}"), "prepare")
    assert "has no tokenizer" in line and "copy the tokenizer files" in line
    # truncated external data: no traceback, and int8-dynamic leaves nothing beside its input
    data = project / "models/onnx/tiny-qwen2.onnx.data"
    data.chmod(0o644)
    os.truncate(data, data.stat().st_size // 2)
    for precision in ("int8-block", "int8-dynamic"):
        line = error_line(run_cli(project, "quantize", "--precision", precision), "quantize")
        assert "tiny-qwen2.onnx.data is damaged or incomplete" in line
    assert sorted(p.name for p in (project / "models/onnx").iterdir() if "inferred" in p.name or
                  p.name.startswith(".")) == []
    # nonsense sequence lengths
    for bad in ("0", "-1"):
        line = error_line(run_cli(project, "export-npu", "--seq-len", bad), "export-npu")
        assert f"sequence length must be at least 2, got {bad}" in line


@pytest.mark.slow
def test_a_damaged_context_binary_is_an_error_not_a_fallback(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    binary = project / "models/qnn/tiny-qwen2-w8a16-s32_ctx_qnn.bin"
    binary.chmod(0o644)
    os.truncate(binary, binary.stat().st_size // 2)
    before = (project / "metrics/bench/qnn-htp-w8a16-32.json").read_text()
    line = error_line(run_cli(project, "bench", "--run", "qnn-htp-w8a16-32"), "bench")
    assert "re-run `dvc repro compile`" in line
    assert (project / "metrics/bench/qnn-htp-w8a16-32.json").read_text() == before  # nothing recorded


@pytest.mark.slow
def test_sigterm_mid_export_leaves_no_staging_copies(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    proc = subprocess.Popen([sys.executable, "-m", "antinet_npu", "export"], cwd=project, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((project / "models").glob(".export-*")):
        time.sleep(0.05)  # wait until the export is writing its scratch copy
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    leftovers = [p for p in (project / "models").rglob(".*") if p.name.startswith((".export-", ".staging-"))]
    assert leftovers == []


def _fill(folder):
    with open(folder / "filler", "wb", buffering=0) as f:  # unbuffered: closing it writes nothing more
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass


@pytest.mark.slow
@pytest.mark.parametrize("folder,args", [("metrics/evaluate", ("evaluate", "--precision", "fp32")),
                                         ("reports", ("report",)), ("models/onnx", ("export",))])
def test_disk_full_is_one_line_and_leaves_no_partial_file(pipeline, tmp_path, folder, args):
    project = clone_project(pipeline.path, tmp_path / "p")
    target = project / folder
    keep = tmp_path / "keep"
    shutil.copytree(target, keep)  # what the stage reads from that folder goes back on the small disk
    shutil.rmtree(target)
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(target)],
                      capture_output=True).returncode:
        pytest.skip("needs to mount a small tmpfs (root)")
    try:
        for item in keep.iterdir():
            if item.is_file() and folder == "models/onnx" and not item.name.startswith("tiny-qwen2.onnx"):
                continue  # room for the inputs only
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, target / item.name)
        before = sorted(p.name for p in target.iterdir())
        _fill(target)
        line = error_line(run_cli(project, *args), args[0])
        assert "No space left on device" in line and "free disk space" in line, line
        assert sorted(p.name for p in target.iterdir()) == sorted([*before, "filler"])
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_bench_logs_are_cached_outputs():
    """A fresh clone that shares the DVC cache gets them back, so the bench stages are not stale."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outs = stages["bench"]["do"]["outs"]
    assert outs == ["logs/bench/${key}.log"]  # a plain entry: cached (no `cache: false`)


def test_an_unreachable_hub_is_detected_at_once(monkeypatch):
    import socket

    from antinet_npu.build import checkpoint

    def refuse(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = {}
    monkeypatch.setattr(checkpoint, "_from_pretrained", lambda where, cfg, local_only: seen.update(local=local_only))
    checkpoint._load_hub(types.SimpleNamespace(source="Qwen/Qwen2-1.5B"))
    assert seen == {"local": True}  # the local cache only: no retries (transformers would spend ~25 s on them)


@pytest.mark.slow
def test_library_info_lines_only_with_verbose(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    quiet = run_cli(project, "quantize", "--precision", "int8-dynamic", check=True).stderr
    assert "quantize: models/onnx/tiny-qwen2-int8-dynamic.onnx" in quiet
    assert "Ignore MatMul" not in quiet  # onnxruntime.quantization: one INFO line per node, through the root logger
    assert "Ignore MatMul" in run_cli(project, "-v", "quantize", "--precision", "int8-dynamic", check=True).stderr
