"""dvc.yaml's code deps are each stage's import closure (`antinet_npu.stage_deps`): a module a stage runs cannot change
without `dvc status` naming the stage."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from antinet_npu import stage_deps
from conftest import ROOT, clone_project


def test_every_stage_lists_the_modules_it_imports():
    problems = stage_deps.check(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert not problems, "\n".join([*problems, "fix: python -m antinet_npu.stage_deps --write"])


def test_dvc_yaml_is_what_the_generator_writes():
    text = (ROOT / "dvc.yaml").read_text()
    assert stage_deps.rewrite(text) == text, "run: python -m antinet_npu.stage_deps --write"


def test_the_closure_follows_lazy_imports_subprocess_modules_and_package_inits():
    quantize = stage_deps.required(ROOT / "stages/quantize.py")
    assert {"antinet_npu/build/corpus.py", "antinet_npu/build/checkpoint.py", "antinet_npu/signature.py"} <= quantize
    genai = stage_deps.required(ROOT / "stages/export_genai.py")
    # `python -m`, a package's __init__
    assert {"antinet_npu/build/genai_builder.py", "antinet_npu/runtime/backends/__init__.py"} <= genai
    assert "antinet_npu/runtime/backends/qnn_ep.py" not in genai  # the registry's lazy imports stay out of a stage that
    assert not any(stage_deps.excluded(r) for r in genai)  # never opens a run by name


def test_a_missing_module_is_named_with_the_fix():
    text = (ROOT / "dvc.yaml").read_text().replace("      - antinet_npu/build/corpus.py\n", "", 1)
    problems = stage_deps.check(yaml.safe_load(text))
    assert problems and problems[0].startswith("stage prepare: dvc.yaml misses antinet_npu/build/corpus.py")


@pytest.mark.slow
def test_a_behaviour_change_in_corpus_makes_smoothed_variants_stale(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    corpus = project / "antinet_npu/build/corpus.py"
    corpus.write_text(corpus.read_text() + "\nMIN_WINDOW_TOKENS = 2\n")  # one new line of code, no comment
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "quantize@int8-smooth"], cwd=project,
                         capture_output=True, text=True, check=True).stdout
    assert "quantize@int8-smooth" in out and "modified:           antinet_npu/build/corpus.py" in out
