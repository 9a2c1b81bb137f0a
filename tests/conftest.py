"""Shared fixtures: a throw-away git + DVC copy of this repository, and the pipeline run once inside it.

Tests run the commands a user runs (`dvc repro`, `antinet-npu ...`) on the builtin model; the copy's params.yaml is
composed from conf/ with a few overrides that shrink the work (as `dvc exp run -S` would). No network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# DVC runs stage commands through the shell: the venv running pytest must come first on PATH.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Shrinks the builtin model's training so the whole pipeline fits the test budget; the code paths are the same.
# per text domain (two): 8 evaluation windows, 4 greedy prompts in evaluate, 2 on the HTP backend and in Genie
TEST_OVERRIDES = ["model.builtin.train_steps=60", "evaluate.num_samples=8", "evaluate.gen_prompts=4",
                  "compile.generation.verify_prompts=2", "compile.seq_lens=[32]",
                  "~bench.runs.qnn-htp-w8a16-128", "bench.warmup=1", "bench.iterations=3",
                  "bench.generation.new_tokens=16", "bench.generation.iterations=2"]


@dataclass
class Project:
    path: Path
    first_run: list[str]

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return run_cli(self.path, *args, check=check)

    def reproduce(self, *targets: str, **kwargs) -> list[str]:
        return reproduce(self.path, *targets, **kwargs)


def run_cli(cwd: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "antinet_npu", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"antinet-npu {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one-line error a failed command printed last; asserts exit 1 and no traceback."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"antinet-npu {command}: error:"), proc.stderr
    return last


def reproduce(path: Path, *targets: str, **kwargs) -> list[str]:
    """Stages `dvc repro` ran (names), through DVC's Python API."""
    from dvc.repo import Repo

    with contextlib.chdir(path), Repo(".") as repo:  # DVC resolves stage paths against the working directory
        return sorted(stage.addressing for stage in repo.reproduce(*targets, **kwargs))


def make_project(dest: Path, overrides: list[str] = TEST_OVERRIDES) -> Path:
    """A fresh git + DVC copy of the working tree (tracked and untracked-but-not-ignored files)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        # produced metrics stay behind; each metrics folder's .gitkeep and other devices' results come along
        produced = name.startswith("reports/") or (name.startswith("metrics/") and name.endswith(".json")
                                                   and not name.startswith("metrics/devices/"))
        if src.is_file() and not produced and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    run_cli(dest, "compose", "--write", *overrides, check=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "test copy"], cwd=dest, check=True)
    return dest


def clone_project(src: Path, dest: Path) -> Path:
    """A copy of a built project (artifacts, DVC cache and lock included), to mutate without rebuilding."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Project:
    """The default pipeline reproduced once in a fresh copy. Treat as read-only; clone it to change things.

    For your own loop, ANTINET_TEST_PIPELINE=<a pipeline dir an earlier session built and left up to date> skips the
    build (tests of the first run's stage list then see an empty one)."""
    if kept := os.environ.get("ANTINET_TEST_PIPELINE"):
        return Project(Path(kept), [])
    path = make_project(tmp_path_factory.mktemp("pipeline"))
    return Project(path, reproduce(path))


@pytest.fixture
def project(tmp_path) -> Project:
    """An empty fresh copy (nothing built)."""
    return Project(make_project(tmp_path / "project"), [])
