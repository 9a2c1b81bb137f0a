"""Stage `export`: `models/pytorch/<model>/` -> `models/onnx/<model>.onnx` (+ `.onnx.data`).

Inputs `input_ids`, `attention_mask` -> `logits`, dynamic batch and sequence axes (as the seed's graph). The export is
checked against PyTorch on held-out text, at two sequence lengths and with left padding, before it is kept.
"""

from __future__ import annotations

import gc
import logging
import time

import numpy as np
import torch

from antinet_npu import AntinetError, artifacts, checkpoint, corpus, onnx_export, onnx_models
from antinet_npu.config import Config
from antinet_npu.provenance import record

log = logging.getLogger("export")


def validation_batches(cfg: Config, tokenizer, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, attention_mask) pairs of held-out text: batch 2, full and shorter length, one left-padded row."""
    seq = min(cfg.export.validate_seq_len, max_len)
    ids = corpus.windows(tokenizer, corpus.split_documents(cfg.text)["eval"], seq, 2 * cfg.export.validate_batches,
                         "evaluation")
    batches = []
    for i in range(cfg.export.validate_batches):
        length = seq if i % 2 == 0 else seq // 2 + 1
        batch = ids[2 * i: 2 * i + 2, :length]
        mask = np.ones_like(batch)
        if i == 1:
            mask[0, : length // 4] = 0  # left padding, as a batched generate() would feed
        batches.append((batch, mask))
    return batches


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    model = checkpoint.load_snapshot(snapshot)
    batches = validation_batches(cfg, checkpoint.load_text_tokenizer(snapshot), checkpoint.max_positions(model.config))
    with torch.no_grad():
        expected = [model(input_ids=torch.from_numpy(i), attention_mask=torch.from_numpy(m), use_cache=False)
                    .logits.numpy() for i, m in batches]
    out = artifacts.onnx_path(cfg.model.name)
    log.info("exporting %s to ONNX (opset %d, %s exporter)", snapshot, cfg.export.opset, cfg.export.exporter)
    with artifacts.staged_files(out.parent) as tmp:
        onnx_export.export_dynamic(model, tmp / out.name, cfg.export.opset, cfg.export.exporter)
        export_seconds = time.perf_counter() - start
        del model
        gc.collect()
        session = onnx_models.cpu_session(tmp / out.name)
        diffs = [np.abs(onnx_models.run_logits(session, i, m) - ref)[m.astype(bool)].max()
                 for (i, m), ref in zip(batches, expected)]
        del session
        max_diff = float(max(diffs))
        if not max_diff <= cfg.export.max_abs_diff:
            raise AntinetError(f"exported ONNX logits differ from PyTorch by {max_diff:.3g} > export.max_abs_diff "
                               f"{cfg.export.max_abs_diff}: try another export.opset or export.exporter")
    metrics = record(model=cfg.model.name, opset=cfg.export.opset, exporter=cfg.export.exporter,
                     max_abs_diff=max_diff, validated_batches=len(batches),
                     size_mb=round(artifacts.onnx_size_mb(out), 3), export_seconds=round(export_seconds, 2),
                     seconds=round(time.perf_counter() - start, 2))
    artifacts.write_metrics(artifacts.METRICS / "export.json", metrics)
    log.info("%s (%.1f MB), max |logits - PyTorch| %.2e over %d batches, in %.1f s", out,
             metrics["size_mb"], max_diff, len(batches), metrics["seconds"])
    return metrics
