"""Stage `prepare`: model source (builtin, local directory or hub id) -> `models/pytorch/<model>/`.

The snapshot holds float32 weights (safetensors), config and tokenizer, written by `save_pretrained`. Same params give
byte-identical files, so DVC does not re-run later stages for nothing.
"""

from __future__ import annotations

import logging
import time

from antinet_npu import artifacts
from antinet_npu.build import checkpoint, corpus
from antinet_npu.config import Config
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import PREPARE

log = logging.getLogger("prepare")


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    out = artifacts.pytorch_dir(cfg.model.name)
    train_docs = corpus.split_documents(cfg.text)["train"] if cfg.model.is_builtin else None
    log.info("building %s from %s", cfg.model.name, cfg.model.source)
    model, tokenizer, info = checkpoint.load_source(cfg.model, train_docs)
    with artifacts.staged_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    metrics = record(model=cfg.model.name, source=cfg.model.source, **info, **checkpoint.describe(model),
                     size_mb=round(size_mb, 2), seconds=round(time.perf_counter() - start, 2))
    PREPARE.write(metrics)
    log.info("%s -> %s (%.2fM parameters, %.1f MB%s) in %.1f s", cfg.model.source, out,
             info["num_parameters"] / 1e6, size_mb,
             f", train loss {info['train_loss']:.3f}" if "train_loss" in info else "", metrics["seconds"])
    return metrics
