"""Stage `export-genai` (matrix over bench.generation.genai_precisions): the peer's own build of the same snapshot.

onnxruntime-genai's model builder (`-e cpu`) turns `models/pytorch/<model>/` into `models/genai/<model>-<precision>/`
(GroupQueryAttention, MatMulNBits, its genai_config.json), in its own process, through
`antinet_npu.build.genai_builder`: the builder unchanged but for one float copy of the weights in memory instead of
two (same output bytes). Checked
before it is kept: greedy generation from held-out prompts, compared with our FP32 ONNX model token for token
(agreement recorded).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, onnx_models
from antinet_npu.config import Config
from antinet_npu.measure import peers
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import EXPORT_GENAI
from antinet_npu.runtime.backends.ort_genai import GenaiStepper, require

log = logging.getLogger("export-genai")


def run(cfg: Config, precision: str) -> dict:
    gen = cfg.bench.generation
    if precision not in gen.genai_precisions:
        raise AntinetError(f"unknown onnxruntime-genai precision {precision!r}: bench.generation.genai_precisions "
                           f"has {', '.join(gen.genai_precisions)}")
    og = require()
    snapshot, out = artifacts.pytorch_dir(cfg.model.name), artifacts.genai_dir(cfg.model.name, precision)
    checkpoint.snapshot_config(snapshot)  # one-line error when `prepare` has not run
    reference = artifacts.onnx_path(cfg.model.name)
    onnx_models.check_model(reference)
    start = time.perf_counter()
    log.info("onnxruntime-genai model builder: %s -> %s (%s, cpu)", snapshot, out, precision)
    with artifacts.staged_dir(out) as tmp:
        cmd = [sys.executable, "-m", "antinet_npu.build.genai_builder", "-i", str(snapshot), "-o", str(tmp),
               "-p", precision, "-e", "cpu", "-c", str(tmp / ".cache")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AntinetError(f"onnxruntime-genai's model builder failed on {snapshot} ({tail[0][:200]}): see "
                               f"`{' '.join(cmd)}`")
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the builder's download cache (a local source: empty)
        build_seconds = time.perf_counter() - start
        context = checkpoint.max_positions(checkpoint.snapshot_config(snapshot))
        agreement = peers.greedy_agreement(cfg, lambda: GenaiStepper(og.Model(str(tmp)), context))
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    metrics = record(model=cfg.model.name, precision=precision, execution_provider="cpu",
                     builder_peak_rss_mb=_children_peak_rss_mb(), size_mb=round(size_mb, 3),
                     **agreement,
                     build_seconds=round(build_seconds, 2), seconds=round(time.perf_counter() - start, 2))
    EXPORT_GENAI.write(metrics, precision)
    log.info("%s (%.1f MB): greedy tokens equal to our FP32 export %.3f over %d prompts x %d, in %.1f s", out,
             size_mb, agreement["gen_agreement"], agreement["gen_prompts"], agreement["gen_tokens"], metrics["seconds"])
    return metrics


def _children_peak_rss_mb() -> float | None:
    """Peak memory of the builder process (it ran as a child), where the OS reports it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3, 1)  # kB on Linux
