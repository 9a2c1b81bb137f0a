"""Stage `evaluate` (matrix over evaluate.variants): fidelity of each CPU variant against the FP32 ONNX model.

Held-out windows of the text source (never calibration or training text) go through both models on onnxruntime's
CPU EP; metrics/evaluate/<precision>.json gets top-1 agreement, cosine, KL, max |error| and perplexities, and the
variant's gate (evaluate.gates) decides pass or fail (or only warns: mode warn, for the section or one gate).
"""

from __future__ import annotations

import gc
import logging
import time

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, corpus, onnx_models
from antinet_npu.config import REFERENCE, Config
from antinet_npu.measure import fidelity
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import EVALUATE
from antinet_npu.runtime import generation
from antinet_npu.signature import Signature

log = logging.getLogger("evaluate")


def run(cfg: Config, precision: str) -> dict:
    ev = cfg.evaluate
    if precision not in ev.variants:
        raise AntinetError(f"unknown precision {precision!r}: evaluate.variants has {', '.join(ev.variants)}")
    ref_path = artifacts.onnx_path(cfg.model.name)
    var_path = ref_path.parent / ev.variants[precision]
    onnx_models.check_model(ref_path)
    if not var_path.is_file():
        raise AntinetError(f"{var_path} not found: run `dvc repro quantize@{precision}` first")
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    tokenizer = checkpoint.load_text_tokenizer(snapshot)
    limit = checkpoint.max_positions(checkpoint.snapshot_config(snapshot))
    if ev.seq_len > limit:
        raise AntinetError(f"evaluate.seq_len {ev.seq_len} exceeds the model's maximum positions ({limit}): "
                           "lower evaluate.seq_len")
    docs = corpus.split_documents(cfg.text)["eval"]
    windows = corpus.windows(tokenizer, docs, ev.seq_len, ev.num_samples, "evaluation")
    prompts = corpus.generation_prompts(tokenizer, docs, ev.prompt_len, ev.gen_prompts)
    ref_sig, var_sig = Signature.read(ref_path), Signature.read(var_path)

    start = time.perf_counter()
    # One session at a time: FP32 logits first, then the variant (two 1.5B sessions together pass 14 GB).
    reference = onnx_models.cpu_session(ref_path, ev.threads)
    expected = [onnx_models.run_logits(reference, ref_sig, ids[None, :]) for ids in windows]
    greedy = [list(generation.generate(generation.OrtKvStepper(reference, ref_sig), p, ev.gen_tokens))
              for p in prompts]
    if var_path == ref_path:
        variant = reference  # fp32 against itself: the reference row (perplexity_fp32), one load
    else:
        del reference
        gc.collect()
        variant = onnx_models.cpu_session(var_path, ev.threads)
    meter = fidelity.FidelityMeter()
    for i, (ids, ref) in enumerate(zip(windows, expected)):
        meter.add(ref, onnx_models.run_logits(variant, var_sig, ids[None, :]), ids[None, :])
        if (i + 1) % max(1, len(windows) // 4) == 0:
            log.info("%s: %d/%d windows", precision, i + 1, len(windows))
    continuations = [list(generation.generate(generation.OrtKvStepper(variant, var_sig), p, ev.gen_tokens))
                     for p in prompts]
    del variant, expected
    gc.collect()
    result = {**meter.result(), **fidelity.generation_agreement(greedy, continuations)}
    gate = ev.gate(precision)
    violations = [] if precision == REFERENCE else fidelity.gate_violations(precision, result, gate)
    metrics = record(model=cfg.model.name, precision=precision, backend="ort-cpu", device="cpu", emulated=False,
                     samples=len(windows), seq_len=ev.seq_len, gen_prompts=len(prompts),
                     gen_tokens=ev.gen_tokens, **result,
                     size_mb=round(artifacts.onnx_size_mb(var_path), 3),
                     size_ratio=round(artifacts.onnx_size_mb(var_path) / artifacts.onnx_size_mb(ref_path), 4),
                     gate_passed=not violations, seconds=round(time.perf_counter() - start, 2))
    EVALUATE.write(metrics, precision)
    greedy_text = (f"greedy tokens equal to FP32 {result['gen_agreement']:.3f} (first divergence at "
                   f"{result['gen_first_divergence']:.1f} of {ev.gen_tokens})" if prompts.size else "no greedy check")
    log.info("%s: top-1 %.4f, cosine %.5f, KL %.2e, perplexity %.2f (FP32 %.2f, %+.2f%%%s), %s, %s", precision,
             result["top1_agreement"], result["cosine"], result["kl"], result["perplexity"], result["perplexity_fp32"],
             100 * result["ppl_increase"], fidelity.interval_text(result), greedy_text,
             "gate passed" if not violations else "GATE FAILED")
    if violations:
        mode = ev.gate_mode(precision)
        message = "fidelity gate: " + "; ".join(violations) + f" (bounds in evaluate.gates; mode {mode})"
        if mode == "fail":
            raise AntinetError(message)
        log.warning(message)
    return metrics
