"""Stage `export-npu` (matrix over compile.seq_lens): snapshot -> static FP32 graph `models/npu/<model>-s<S>.onnx`.

input_ids (1, S), additive float causal mask (1, 1, S, S), position_ids (1, S) -> logits; eager attention. This is
the graph the HTP backend accepts; `compile` quantizes and compiles it. Checked against the model's own forward.
"""

from __future__ import annotations

import gc
import logging
import time

import torch

from antinet_npu import artifacts
from antinet_npu.build import checkpoint, corpus, onnx_export, onnx_models
from antinet_npu.config import Config
from antinet_npu.measure import fidelity
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import EXPORT_NPU

log = logging.getLogger("export-npu")


def run(cfg: Config, seq_len: int) -> dict:
    start = time.perf_counter()
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    model = checkpoint.load_snapshot(snapshot)
    checkpoint.check_seq_len(seq_len, checkpoint.max_positions(model.config), "remove it from compile.seq_lens")
    ids = corpus.windows(checkpoint.load_text_tokenizer(snapshot), corpus.split_documents(cfg.text)["eval"], seq_len, 1,
                         "evaluation")
    with torch.no_grad():  # the model's own causal masking, as a user calls it
        expected = model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    out = artifacts.npu_onnx_path(cfg.model.name, seq_len)
    log.info("exporting static S=%d graph to %s", seq_len, out)
    with artifacts.staged_files(out.parent) as tmp:
        signature = onnx_export.export_static(model, tmp / out.name, seq_len, cfg.compile.opset,
                                              cfg.compile.mask_value, cfg.compile.rmsnorm)
        del model
        gc.collect()
        session = onnx_models.cpu_session(tmp / out.name)
        got = session.run(None, signature.static_feeds(ids))[0]
        error = fidelity.export_error([(got, expected, None)])
        fidelity.check_export(error, cfg.export.max_rel_diff, cfg.export.min_top1, f"the static S={seq_len} graph",
                              "check compile.mask_value")
        signature.write(tmp / out.name)
    metrics = record(model=cfg.model.name, seq_len=seq_len, opset=cfg.compile.opset, rmsnorm=cfg.compile.rmsnorm,
                     **error,
                     size_mb=round(artifacts.onnx_size_mb(out), 3), seconds=round(time.perf_counter() - start, 2))
    EXPORT_NPU.write(metrics, EXPORT_NPU.key(seq_len=seq_len))
    log.info("%s: max |logits - PyTorch| %.2e (%.1e of their scale), in %.1f s", out, error["max_abs_diff"],
             error["max_rel_diff"], metrics["seconds"])
    return metrics
