"""Turning a PyTorch causal LM into ONNX graphs: the dynamic export (CPU) and the static NPU-friendly export."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from antinet_npu.artifacts import MODELS
from antinet_npu.onnx_models import OUTPUT, STATIC_INPUTS, consolidate, static_feeds

log = logging.getLogger(__name__)
INPUTS = ("input_ids", "attention_mask")


class CausalLMLogits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits of every position; no KV cache, as the seed's graph."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_dynamic(model: torch.nn.Module, out: Path, opset: int, exporter: str = "torchscript") -> None:
    """Export with dynamic batch and sequence axes to `out` (+ `out.data`)."""
    sample_ids = torch.ones((2, 8), dtype=torch.int64)
    sample_mask = torch.ones((2, 8), dtype=torch.int64)
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, OUTPUT)}
    MODELS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS, prefix=".export-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in transformers
        raw = Path(tmp) / "raw.onnx"
        kwargs = dict(input_names=list(INPUTS), output_names=[OUTPUT], opset_version=opset)
        with torch.no_grad():
            if exporter == "dynamo":
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                shapes = {name: {0: batch, 1: seq} for name in INPUTS}
                torch.onnx.export(CausalLMLogits(model), (sample_ids, sample_mask), raw, dynamo=True,
                                  dynamic_shapes={"input_ids": shapes["input_ids"],
                                                  "attention_mask": shapes["attention_mask"]},
                                  external_data=True, **kwargs)
            else:
                torch.onnx.export(CausalLMLogits(model), (sample_ids, sample_mask), raw, dynamo=False,
                                  dynamic_axes=dynamic_axes, **kwargs)
        consolidate(raw, out)


class StaticCausalLM(torch.nn.Module):
    """(input_ids, additive float mask (1, 1, S, S), position_ids) -> logits: the NPU-friendly form.

    The HTP backend needs static shapes and rejects the Where-based mask transformers builds from an int64
    attention_mask, so the mask is an input, computed once on the host (`causal_mask`).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits

def export_static(model: torch.nn.Module, out: Path, seq_len: int, opset: int, mask_value: float) -> None:
    """Static-shape export for the NPU: batch 1, `seq_len` tokens, eager attention, TorchScript exporter."""
    feeds = {k: torch.from_numpy(v) for k, v in static_feeds(np.zeros((1, seq_len), np.int64), mask_value).items()}
    MODELS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS, prefix=".export-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(StaticCausalLM(model), tuple(feeds[k] for k in STATIC_INPUTS), raw, dynamo=False,
                              input_names=list(STATIC_INPUTS), output_names=[OUTPUT], opset_version=opset)
        consolidate(raw, out)
