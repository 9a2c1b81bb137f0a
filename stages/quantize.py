"""Stage `quantize` (matrix over quantize.precisions): FP32 ONNX -> `models/onnx/<model>-<precision>.onnx`.

The recipe for each precision comes from `quantize.recipes.<precision>`; fidelity is measured by `evaluate`.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time

import onnx

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, corpus, onnx_models, quantization, sensitivity
from antinet_npu.config import Config
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import QUANTIZE
from antinet_npu.signature import Signature

log = logging.getLogger("quantize")
# Recipe fields that matter for each method (recorded in the metrics; the rest do not apply).
METHOD_FIELDS = {
    "fp16": ("keep_io_types",),
    "dynamic-int8": ("weight_type", "per_channel", "reduce_range"),
    "matmul-nbits": ("bits", "block_size", "symmetric", "accuracy_level", "algorithm"),
}


def run(cfg: Config, precision: str) -> dict:
    recipes = cfg.quantize.recipes
    if precision not in recipes:
        raise AntinetError(f"unknown precision {precision!r}: valid ones are {', '.join(recipes)} "
                           "(or add a recipe under quantize.recipes)")
    recipe = recipes[precision]
    src, out = artifacts.onnx_path(cfg.model.name), artifacts.onnx_path(cfg.model.name, precision)
    onnx_models.check_model(src)
    signature = Signature.read(src)  # weights change, inputs and outputs do not
    # MatMulNBits quantizes MatMuls only; quantize_dynamic also the embedding Gather.
    nodes = quantization.weight_groups(src, ("MatMul",) if recipe.method == "matmul-nbits" else ("MatMul", "Gather"))
    groups = sensitivity.kept_groups(recipe.mixed, cfg.model.name, nodes)
    keep = [n for g in groups for n in nodes[g]]
    calibration = None
    if recipe.smooth:  # activation ranges from calibration text (never the evaluation text)
        snapshot = artifacts.pytorch_dir(cfg.model.name)
        checkpoint.check_seq_len(recipe.smooth.seq_len, checkpoint.max_positions(checkpoint.snapshot_config(snapshot)),
                                 f"lower quantize.recipes.{precision}.smooth.seq_len")
        calibration = corpus.calibration_windows(checkpoint.load_text_tokenizer(snapshot), cfg.text,
                                                 recipe.smooth.seq_len, recipe.smooth.samples)
    start = time.perf_counter()
    log.info("quantizing %s -> %s (%s)%s", src, out, recipe.method,
             f", keeping {len(keep)} nodes of {', '.join(groups)} as {recipe.mixed.keep_as}" if keep else "")
    with artifacts.staged_files(out.parent) as tmp:
        quantization.quantize(src, recipe, tmp / out.name, keep, calibration)
        signature.write(tmp / out.name)
        gc.collect()
        ops = quantization.op_histogram(onnx.load(tmp / out.name, load_external_data=False))
    size_mb, fp32_mb = artifacts.onnx_size_mb(out), artifacts.onnx_size_mb(src)
    settings = {k: v for k, v in dataclasses.asdict(recipe).items() if k in METHOD_FIELDS[recipe.method]}
    metrics = record(model=cfg.model.name, precision=precision, method=recipe.method, **settings,
                     excluded_nodes=len(recipe.nodes_to_exclude),
                     **sensitivity.mixed_metrics(recipe.mixed, groups, keep),
                     **({"smooth_alpha": recipe.smooth.alpha, "smooth_samples": recipe.smooth.samples,
                         "smooth_seq_len": recipe.smooth.seq_len} if recipe.smooth else {}),
                     size_mb=round(size_mb, 3),
                     size_ratio=round(size_mb / fp32_mb, 4), quantized_ops=_quantized_ops(ops),
                     seconds=round(time.perf_counter() - start, 2))
    QUANTIZE.write(metrics, precision)
    log.info("%s: %.1f MB (%.2fx FP32), %d quantized ops, in %.1f s", out, size_mb, metrics["size_ratio"],
             metrics["quantized_ops"], metrics["seconds"])
    return metrics


def _quantized_ops(ops: dict[str, int]) -> int:
    return sum(n for op, n in ops.items()
               if op in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "GatherBlockQuantized")
               or op.startswith("QLinear"))
