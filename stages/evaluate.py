"""Stage `evaluate` (matrix over evaluate.variants): fidelity of each CPU variant against the FP32 ONNX model.

Held-out windows of each text domain (never calibration or training text) go through both models on onnxruntime's
CPU EP; metrics/evaluate/<precision>.json gets top-1 agreement, cosine, KL, max |error|, perplexities and greedy
agreement over every domain's windows and, under "domains", each domain's own; the variant's gate (evaluate.gates)
is judged on each domain and decides pass or fail (or only warns: mode warn, for the section or one gate).
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
    windows = corpus.evaluation_windows(tokenizer, cfg.text, ev.seq_len, ev.num_samples)
    prompts = corpus.held_out_prompts(tokenizer, cfg.text, ev.prompt_len, ev.gen_prompts)
    ref_sig, var_sig = Signature.read(ref_path), Signature.read(var_path)

    start = time.perf_counter()
    # One session at a time: FP32 logits first, then the variant (two 1.5B sessions together pass 14 GB).
    reference = onnx_models.cpu_session(ref_path, ev.threads)
    expected = {d: [onnx_models.run_logits(reference, ref_sig, ids[None, :]) for ids in w] for d, w in windows.items()}
    greedy = {d: [list(generation.generate(generation.OrtKvStepper(reference, ref_sig), p, ev.gen_tokens)) for p in ps]
              for d, ps in prompts.items()}
    if var_path == ref_path:
        variant = reference  # fp32 against itself: the reference row (perplexity_fp32), one load
    else:
        del reference
        gc.collect()
        variant = onnx_models.cpu_session(var_path, ev.threads)
    meter = fidelity.DomainMeter()
    for domain, domain_windows in windows.items():
        for ids, ref in zip(domain_windows, expected[domain]):
            meter.add(domain, ref, onnx_models.run_logits(variant, var_sig, ids[None, :]), ids[None, :])
        log.info("%s: %s, %d windows", precision, domain, len(domain_windows))
        meter.add_greedy(domain, greedy[domain], [
            list(generation.generate(generation.OrtKvStepper(variant, var_sig), p, ev.gen_tokens))
            for p in prompts[domain]])
    del variant, expected
    gc.collect()
    result = meter.result()
    gate = ev.gate(precision)
    violations = [] if precision == REFERENCE else fidelity.domain_violations(precision, result, gate)
    metrics = record(model=cfg.model.name, precision=precision, backend="ort-cpu", device="cpu", emulated=False,
                     samples=sum(len(w) for w in windows.values()), seq_len=ev.seq_len,
                     gen_prompts=sum(len(p) for p in prompts.values()),
                     gen_tokens=ev.gen_tokens, **result,
                     size_mb=round(artifacts.onnx_size_mb(var_path), 3),
                     size_ratio=round(artifacts.onnx_size_mb(var_path) / artifacts.onnx_size_mb(ref_path), 4),
                     gate_passed=not violations, seconds=round(time.perf_counter() - start, 2))
    EVALUATE.write(metrics, precision)
    for domain, figures in result["domains"].items():
        greedy_text = (f"greedy tokens equal to FP32 {figures['gen_agreement']:.3f} (first divergence at "
                       f"{figures['gen_first_divergence']:.1f} of {ev.gen_tokens})" if "gen_agreement" in figures
                       else "no greedy check")
        log.info("%s on %s: top-1 %.4f, cosine %.5f, KL %.2e, perplexity %.2f (FP32 %.2f, %+.2f%%%s), %s", precision,
                 domain, figures["top1_agreement"], figures["cosine"], figures["kl"], figures["perplexity"],
                 figures["perplexity_fp32"], 100 * figures["ppl_increase"], fidelity.interval_text(figures),
                 greedy_text)
    log.info("%s: %s", precision, "gate passed on every domain" if not violations else "GATE FAILED")
    if violations:
        mode = ev.gate_mode(precision)
        message = "fidelity gate: " + "; ".join(violations) + f" (bounds in evaluate.gates; mode {mode})"
        if mode == "fail":
            raise AntinetError(message)
        log.warning(message)
    return metrics
