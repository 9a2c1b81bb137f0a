"""Builds shared through real DVC and git remotes (a shared-directory DVC remote, a bare git repository): a second
builder gets the whole build without running a stage, a device clone fetches only what its runs load and measures
them into metrics/devices/, a queued sweep runs through two workers and travels with `dvc exp push` / `pull`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_OVERRIDES, clone_project, error_line, reproduce, run_cli

pytestmark = pytest.mark.slow
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def shared(pipeline, tmp_path_factory):
    """The built pipeline as a builder publishes it: committed, pushed to a bare git repository and its outputs
    (with the run-cache) to a shared-directory DVC remote named in the committed .dvc/config."""
    base = tmp_path_factory.mktemp("shared")
    builder = clone_project(pipeline.path, base / "builder")
    origin, storage = base / "origin.git", base / "dvc-storage"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    dvc(builder, "remote", "add", "-d", "shared", str(storage))
    git(builder, "add", "-A")
    git(builder, "commit", "-qm", "built")
    branch = git(builder, "rev-parse", "--abbrev-ref", "HEAD").strip()
    git(builder, "remote", "add", "origin", str(origin))
    git(builder, "push", "-q", "origin", branch)
    start = time.perf_counter()
    dvc(builder, "push", "--run-cache")
    print(f"dvc push --run-cache: {size(storage) / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s "
          f"({len(files(storage))} objects)")
    return builder, origin, storage, branch


def clone(origin: Path, dest: Path, branch: str) -> Path:
    subprocess.run(["git", "clone", "-q", "-b", branch, str(origin), str(dest)], check=True)
    return dest


def test_a_second_builder_gets_the_whole_build_without_running_a_stage(shared, tmp_path):
    builder, origin, storage, branch = shared
    second = clone(origin, tmp_path / "second", branch)
    start = time.perf_counter()
    dvc(second, "pull")
    print(f"dvc pull: {size(second / 'models') / 1e6:.1f} MB of models/ in {time.perf_counter() - start:.1f} s")
    assert dvc(second, "status").stdout.strip() == "Data and pipelines are up to date."
    assert reproduce(second) == []
    assert files(second / "models") == files(builder / "models")

    # or straight from the run-cache: `dvc repro --pull` restores every stage instead of running it
    third = clone(origin, tmp_path / "third", branch)
    out = dvc(third, "repro", "--pull").stdout
    assert "Running stage" not in out, out
    assert dvc(third, "status").stdout.strip() == "Data and pipelines are up to date."


def test_a_device_fetches_only_what_its_runs_load_and_its_results_come_back_through_git(shared, tmp_path):
    builder, origin, storage, branch = shared
    device = clone(origin, tmp_path / "device", branch)
    lock = (device / "dvc.lock").read_text()
    runs = ["ort-cpu-int8-dynamic-32", "ort-cpu-int8-block"]  # CPU runs stand in for the NPU's here
    proc = run_cli(device, "device", "--name", "test-laptop", *(a for r in runs for a in ("--run", r)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fetched" in proc.stderr and " MB for 2 runs" in proc.stderr
    snapshot, onnx = "pytorch/tiny-qwen2", "onnx/tiny-qwen2"
    assert files(device / "models") == {
        f"{snapshot}/tokenizer.json", f"{snapshot}/tokenizer_config.json", f"{snapshot}/config.json",
        *(f"{onnx}-{p}.onnx{ext}" for p in ("int8-dynamic", "int8-block") for ext in ("", ".data", ".json"))}
    assert (device / "dvc.lock").read_text() == lock  # nothing upstream ran
    results = device / "metrics" / "devices" / "test-laptop"
    assert json.loads((results / "bench" / "ort-cpu-int8-dynamic-32.json").read_text())["backend"] == "ort-cpu"
    assert json.loads((results / "bench-gen" / "ort-cpu-int8-block.json").read_text())["p32"]["new_tokens"] > 0
    assert git(device, "status", "--porcelain").strip() == "?? metrics/devices/test-laptop/"

    git(device, "add", "metrics/devices")
    git(device, "commit", "-qm", "test-laptop results")
    git(device, "push", "-q", "origin", branch)
    git(builder, "pull", "-q", "origin", branch)
    assert reproduce(builder, "report") == ["report"]
    summary = (builder / "reports" / "summary.md").read_text()
    assert "| test-laptop | ort-cpu | int8-dynamic | 32 |" in summary
    assert "| ort-cpu-int8-block @ test-laptop | ort-cpu | int8-block |" in summary


def test_a_device_without_the_artifacts_gets_one_line_and_nothing_half_pulled(shared, tmp_path):
    builder, origin, storage, branch = shared
    device = clone(origin, tmp_path / "device", branch)
    run = ("--name", "laptop", "--run", "ort-cpu-int8-block")

    (tmp_path / "empty").mkdir()
    dvc(device, "remote", "add", "--local", "empty", str(tmp_path / "empty"))
    line = error_line(run_cli(device, "device", *run, "--remote", "empty"), "device")
    assert "lacks models/onnx/tiny-qwen2-int8-block.onnx (stage quantize@int8-block)" in line
    assert "never pushed" in line

    dvc(device, "remote", "add", "--local", "gone", str(tmp_path / "nowhere"))
    assert "unreachable" in error_line(run_cli(device, "device", *run, "--remote", "gone"), "device")

    dvc(device, "remote", "remove", "shared")
    assert "dvc remote add" in error_line(run_cli(device, "device", *run), "device")
    assert not (device / "models").exists() and not (device / "metrics" / "devices" / "laptop").exists()


def test_a_queued_sweep_runs_through_two_workers_and_travels_with_exp_push(shared, tmp_path):
    builder, origin, storage, branch = shared
    sweeper = clone(origin, tmp_path / "sweeper", branch)
    dvc(sweeper, "pull")
    # -S composes conf/ again: the test's own overrides come along, so only the swept key differs
    keep = [a for o in TEST_OVERRIDES for a in ("-S", o)]
    for warmup in (2, 3):
        dvc(sweeper, "exp", "run", "--queue", "-n", f"warmup-{warmup}", *keep, "-S", f"bench.warmup={warmup}",
            "bench@ort-cpu-fp32-32")
    dvc(sweeper, "queue", "start", "-j", "2")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = dvc(sweeper, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") == 2, status + dvc(sweeper, "queue", "logs", "warmup-2", check=False).stdout

    def shown(repo: Path) -> dict[str, dict]:
        rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
        exps = {e["name"]: e for row in rows for e in row.get("experiments") or [] for e in e["revs"]}
        return {name: e["data"] for name, e in exps.items()}

    exps = shown(sweeper)
    assert set(exps) == {"warmup-2", "warmup-3"}
    for name, data in exps.items():
        warmup = data["params"]["params.yaml"]["data"]["bench"]["warmup"]
        bench = data["metrics"]["metrics/bench/ort-cpu-fp32-32.json"]["data"]
        assert f"warmup-{warmup}" == name and bench["warmup"] == warmup and bench["avg_latency_ms"] > 0

    dvc(sweeper, "exp", "push", "origin", "warmup-2", "warmup-3")
    other = clone(origin, tmp_path / "other", branch)
    dvc(other, "exp", "pull", "origin", "warmup-2", "warmup-3")
    assert set(shown(other)) == {"warmup-2", "warmup-3"}
