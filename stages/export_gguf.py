"""Stage `export-gguf` (matrix over bench.generation.gguf_types): llama.cpp's build of the same snapshot.

`models/pytorch/<model>/` -> a float16 GGUF (`antinet_npu.build.gguf_export`, streamed) -> llama.cpp's own quantizer
-> `models/gguf/<model>-<type>.gguf`. Checked before it is kept, as export-genai checks its peer: greedy generation
from held-out prompts against our FP32 ONNX model, token for token (agreement recorded).
"""

from __future__ import annotations

import logging
import os
import time

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, gguf_export, onnx_models
from antinet_npu.config import Config
from antinet_npu.measure import peers
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import EXPORT_GGUF
from antinet_npu.runtime.backends import llama_cpp

log = logging.getLogger("export-gguf")


def run(cfg: Config, file_type: str) -> dict:
    gen = cfg.bench.generation
    if file_type not in gen.gguf_types:
        raise AntinetError(f"unknown GGUF type {file_type!r}: bench.generation.gguf_types has "
                           f"{', '.join(gen.gguf_types) or 'nothing'}")
    module = llama_cpp.require()
    snapshot, out = artifacts.pytorch_dir(cfg.model.name), artifacts.gguf_path(cfg.model.name, file_type)
    checkpoint.snapshot_config(snapshot)  # one-line error when `prepare` has not run
    onnx_models.check_model(artifacts.onnx_path(cfg.model.name))
    start = time.perf_counter()
    with artifacts.scratch_dir(out.parent, "gguf") as tmp:  # nothing at `out` until it is built and checked
        floats, staged = tmp / "f16.gguf", tmp / out.name
        log.info("%s -> %s (float16, streamed)", snapshot, floats)
        tensors = gguf_export.write_float(snapshot, floats)
        log.info("llama.cpp %s quantizer: %d tensors -> %s", module.__version__, tensors, file_type)
        gguf_export.quantize(floats, staged, file_type, cfg.bench.threads)
        floats.unlink()
        build_seconds = time.perf_counter() - start
        agreement = peers.greedy_agreement(
            cfg, lambda: llama_cpp.LlamaCppStepper(llama_cpp.load(staged, cfg.bench.threads)))
        os.replace(staged, out)
    size_mb = out.stat().st_size / 1e6
    metrics = record(model=cfg.model.name, precision=file_type, llama_cpp_python=module.__version__,
                     tensor_types=gguf_export.tensor_types(out), size_mb=round(size_mb, 3), **agreement,
                     build_seconds=round(build_seconds, 2), seconds=round(time.perf_counter() - start, 2))
    EXPORT_GGUF.write(metrics, file_type)
    log.info("%s (%.1f MB): greedy tokens equal to our FP32 export %.3f over %d prompts x %d, in %.1f s", out,
             size_mb, agreement["gen_agreement"], agreement["gen_prompts"], agreement["gen_tokens"],
             metrics["seconds"])
    return metrics
