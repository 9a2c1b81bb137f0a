"""Stage `compile` (matrix over compile.precisions x compile.seq_lens): static FP32 graph -> QNN context binary.

Static QDQ calibrated on the calib split, compiled ahead of time by the QNN EP for the target NPU
(`models/qnn/<model>-<precision>-s<S>_ctx.onnx` + `_ctx_qnn.bin`), then verified: the context runs held-out windows
on the HTP backend (the x86_64 emulator here, labelled `emulated`) and is compared with the FP32 graph on CPU.
"""

from __future__ import annotations

import gc
import logging
import time
from functools import partial
from pathlib import Path

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, corpus, onnx_models, qnn, quantization, sensitivity
from antinet_npu.config import Config
from antinet_npu.measure import fidelity
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import COMPILE
from antinet_npu.runtime import cores
from antinet_npu.signature import Signature

log = logging.getLogger("compile")


def run(cfg: Config, precision: str, seq_len: int) -> dict:
    cc = cfg.compile
    qnn.require()
    single_pass = [name for name, r in cc.recipes.items() if not r.fp16]  # fp16: the generation parts only
    if precision in cc.recipes and precision not in single_pass:
        raise AntinetError(f"NPU precision {precision!r} (method fp16) builds the generation parts only: "
                           f"`antinet-npu compile-gen --precision {precision}`; here choose one of "
                           f"{', '.join(single_pass)}")
    if precision not in cc.recipes:
        raise AntinetError(f"unknown NPU precision {precision!r}: valid ones are {', '.join(single_pass)} "
                           "(or add a recipe under compile.recipes)")
    recipe = cc.recipes[precision]
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    checkpoint.check_seq_len(seq_len, checkpoint.max_positions(checkpoint.snapshot_config(snapshot)),
                             "remove it from compile.seq_lens")
    src = artifacts.npu_onnx_path(cfg.model.name, seq_len)
    if not src.is_file():
        raise AntinetError(f"{src} not found: run `dvc repro export-npu@{seq_len}` first")
    onnx_models.check_model(src)
    signature = Signature.read(src)  # QDQ and context graphs keep the static graph's inputs and outputs
    tokenizer = checkpoint.load_text_tokenizer(snapshot)
    calibration = [signature.static_feeds(w)
                   for w in corpus.calibration_windows(tokenizer, cfg.text, seq_len, cc.calib_samples)]
    held_out = corpus.evaluation_windows(tokenizer, cfg.text, seq_len, cc.verify_windows(precision))

    nodes = quantization.weight_groups(src, ("MatMul",))  # the embedding table is quantized as an activation
    groups = sensitivity.kept_groups(recipe.mixed, cfg.model.name, nodes)
    keep = [n for g in groups for n in nodes[g]]
    qdq_out = artifacts.qdq_path(cfg.model.name, precision, seq_len)
    ctx_out = artifacts.ctx_path(cfg.model.name, precision, seq_len)
    with artifacts.staged_files(ctx_out.parent) as tmp:
        start = time.perf_counter()
        blocks = f" in blocks of {recipe.block_size}" if recipe.block_size else ""
        blocks += " with float offsets" if recipe.block_offsets else ""
        log.info("static QDQ %s (%s activations, %s%s weights%s%s), %d calibration windows", precision,
                 recipe.activation_type, recipe.weight_type, blocks,
                 "; float residual stream" if recipe.float_residual else "",
                 f"; {recipe.mixed.keep_as} for {', '.join(groups)}" if groups else "", len(calibration))
        outliers = quantization.recipe_outliers(src, recipe, calibration)
        model = quantization.qdq_static(src, recipe, calibration, keep, outliers=outliers)
        compute_nodes = sum(n.op_type not in qnn.BOUNDARY_OPS for n in model.graph.node)
        onnx_models.save(model, tmp / qdq_out.name)
        signature.write(tmp / qdq_out.name)
        del model, calibration
        gc.collect()
        quantize_seconds = time.perf_counter() - start

        start = time.perf_counter()
        log.info("compiling the QNN context for %s (soc_model %d, htp_arch v%d)", cfg.target.name,
                 cfg.target.soc_model, cfg.target.htp_arch)
        qnn.compile_context(tmp / qdq_out.name, tmp / ctx_out.name, cfg.target, cc.allow_cpu_fallback)
        compile_seconds = time.perf_counter() - start
        contexts, outside = qnn.nodes_outside_context(tmp / ctx_out.name)
        bins = qnn.context_binaries(tmp / ctx_out.name)
        signature.write(tmp / ctx_out.name)

        start = time.perf_counter()
        windows = [(domain, ids) for domain, rows in held_out.items() for ids in rows]
        workers = min(qnn.verify_workers(cc.verify_workers), len(windows))
        log.info("verifying on the QNN HTP backend%s: %d held-out windows (%s), %d process(es)",
                 " (emulator)" if qnn.emulated() else "", len(windows), ", ".join(held_out), workers)
        feeds = [signature.static_feeds(ids) for _, ids in windows]
        graphs = qnn.HtpGraphs(cfg.target, cc.allow_cpu_fallback)
        got = cores.spread(partial(_context_logits, graphs, tmp / ctx_out.name), feeds, workers)
        graphs.close()
        reference = onnx_models.cpu_session(src)
        meter = fidelity.DomainMeter()
        for (domain, _), f, logits in zip(windows, feeds, got):
            meter.add(domain, reference.run(None, f)[0], logits, f["input_ids"])
        del reference, got
        result = meter.result()
        violations = fidelity.domain_violations(f"{precision}-{seq_len}", result, cc.gate(precision))
        metrics = record(
            model=cfg.model.name, precision=precision, seq_len=seq_len, backend="qnn-htp",
            device=qnn.device_name(), emulated=qnn.emulated(), target=cfg.target.name,
            soc_model=cfg.target.soc_model, htp_arch=cfg.target.htp_arch, activation_type=recipe.activation_type,
            weight_type=recipe.weight_type, weight_block_size=recipe.block_size,
            weight_block_offsets=recipe.block_offsets, float_residual=recipe.float_residual,
            float_outliers=recipe.float_outliers, float_outlier_tensors=",".join(outliers),
            **sensitivity.mixed_metrics(recipe.mixed, groups, keep),
            samples=len(windows), **result, context_nodes=contexts,
            compute_nodes=compute_nodes, cpu_compute_nodes=len(outside),
            qnn_node_fraction=round(1 - len(outside) / max(compute_nodes, 1), 6),
            bin_size_mb=round(sum(b.stat().st_size for b in bins) / 1e6, 3),
            qdq_size_mb=round(artifacts.onnx_size_mb(tmp / qdq_out.name), 3),
            quantize_seconds=round(quantize_seconds, 2), compile_seconds=round(compile_seconds, 2),
            verify_seconds=round(time.perf_counter() - start, 2), verify_workers=workers,
            worker_peak_rss_mb=round(cores.worker_peak_rss_mb(), 1), gate_passed=not violations)
        COMPILE.write(metrics, COMPILE.key(precision=precision, seq_len=seq_len))
        if violations and cc.gate_mode(precision) == "fail":
            raise AntinetError("fidelity gate: " + "; ".join(violations) + " (bounds in compile.gates)")
    if violations:
        log.warning("fidelity gate: %s", "; ".join(violations))
    log.info("%s + %s (%.1f MB): top-1 %.4f, cosine %.5f, perplexity %+.2f%%%s vs FP32, %d/%d compute nodes in QNN%s",
             ctx_out.name, ", ".join(b.name for b in bins), metrics["bin_size_mb"], result["top1_agreement"],
             result["cosine"], 100 * result["ppl_increase"], fidelity.interval_text(result),
             compute_nodes - len(outside), compute_nodes, " (emulated)" if qnn.emulated() else "")
    return metrics


def _context_logits(graphs: qnn.HtpGraphs, ctx: Path, feeds: dict):
    return graphs.open(ctx).run(None, feeds)[0]
