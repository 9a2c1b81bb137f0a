"""Stage `sensitivity` (one per sensitivity.probes entry): each layer group's damage under a probe.

The PyTorch snapshot runs calibration windows (never evaluation text) with one group at a time fake-quantized as
the probe says; `metrics/sensitivity/<probe>.json` gets each group's KL and top-1 agreement against the float
model and its rank. Mixed recipes (`mixed: {probe, keep, keep_as}`) read the ranking.
"""

from __future__ import annotations

import logging
import time

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, corpus, sensitivity
from antinet_npu.config import Config
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import SENSITIVITY

log = logging.getLogger("sensitivity")


def run(cfg: Config, probe: str) -> dict:
    import torch

    sc = cfg.sensitivity
    if probe not in sc.probes:
        raise AntinetError(f"unknown probe {probe!r}: sensitivity.probes has {', '.join(sc.probes) or 'none'}")
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    tokenizer = checkpoint.load_text_tokenizer(snapshot)
    checkpoint.check_seq_len(sc.seq_len, checkpoint.max_positions(checkpoint.snapshot_config(snapshot)),
                             "lower sensitivity.seq_len")
    spec = sc.probes[probe]
    static_activations = bool(spec.activation_bits) and spec.activation_granularity == "tensor"
    # Static activation ranges are calibrated on one half and judged on the other (both calibration text).
    windows = corpus.calibration_windows(tokenizer, cfg.text, sc.seq_len,
                                         sc.num_samples * (2 if static_activations else 1))
    if sc.threads:
        torch.set_num_threads(sc.threads)
    model = checkpoint.load_snapshot(snapshot)
    start = time.perf_counter()

    def progress(done: int, total: int, group: str, kl: float) -> None:
        if done % max(1, total // 8) == 0 or done == total:
            log.info("%s: %d/%d groups (%s: KL %.2e)", probe, done, total, group, kl)

    result = sensitivity.measure(model, cfg.model.name, windows[:sc.num_samples], probe, spec, progress=progress)
    if not result.groups:
        raise AntinetError(f"{cfg.model.name} has no layer groups this pipeline recognises (Qwen2/Llama module "
                           "names: layers.N.self_attn.q_proj, mlp.down_proj, lm_head, embed_tokens)")
    activations = {}
    if static_activations:
        activations = sensitivity.measure_activations(model, windows[:sc.num_samples], windows[sc.num_samples:],
                                                      spec.activation_bits)
        log.info("%s: static %d-bit activations by site: %s", probe, spec.activation_bits, ", ".join(
            f"{site} KL {a['kl']:.2e} (widest range {a['widest_range']:.0f})" for site, a in activations.items()))
    metrics = record(**sensitivity.to_metrics(result), **({"activations": activations} if activations else {}),
                     samples=sc.num_samples, seq_len=sc.seq_len, seconds=round(time.perf_counter() - start, 2))
    SENSITIVITY.write(metrics, probe)
    top = result.ranked()[:5]
    log.info("%s: most sensitive %s", probe, ", ".join(f"{g.group} (KL {g.kl:.2e})" for g in top))
    return metrics
