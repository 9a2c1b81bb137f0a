"""Turning a PyTorch causal LM into ONNX graphs: the dynamic export (CPU) and the static NPU-friendly export."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
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
                torch.onnx.export(CausalLMLogits(model), (sample_ids, sample_mask), str(raw), dynamo=True,
                                  dynamic_shapes={"input_ids": shapes["input_ids"],
                                                  "attention_mask": shapes["attention_mask"]},
                                  external_data=True, **kwargs)
            else:
                torch.onnx.export(CausalLMLogits(model), (sample_ids, sample_mask), str(raw), dynamo=False,
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

_PRIVATE_DOMAIN = "antinet_npu"
QDQ_OPSET = 21  # 16-bit Q/DQ needs opset 21; onnxruntime's QDQ quantizer would convert to it anyway


class _RMSNormOp(torch.autograd.Function):
    """RMSNorm as one node: SimplifiedLayerNormalization, which the QNN EP maps to HTP's RmsNorm.

    Exported op by op (Pow, ReduceMean, Sqrt, Div), RMSNorm quantizes x^2 of a real LLM's outlier activations
    into one 16-bit range and loses the small ones; the fused op keeps that arithmetic inside the NPU kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    @staticmethod
    def symbolic(g, x, weight, eps: float):
        # Exported in a private domain so that the opset conversion leaves it alone (`_to_qdq_opset`)
        y = g.op(f"{_PRIVATE_DOMAIN}::SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps,
                 stash_type_i=1)
        y.setType(x.type())
        return y


class _FusedRMSNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, float(norm.variance_epsilon)

    def forward(self, x):
        return _RMSNormOp.apply(x, self.weight, self.eps)


def fuse_rmsnorm(model: torch.nn.Module) -> int:
    """Swap every RMSNorm module (Llama/Qwen2 style: `weight`, `variance_epsilon`) for the one-node form."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon")]
    for parent, name, child in swaps:
        setattr(parent, name, _FusedRMSNorm(child))
    return len(swaps)


def export_static(model: torch.nn.Module, out: Path, seq_len: int, opset: int, mask_value: float,
                  rmsnorm: str = "decomposed") -> None:
    """Static-shape export for the NPU: batch 1, `seq_len` tokens, eager attention, TorchScript exporter.

    rmsnorm="fused" exports each RMSNorm as one SimplifiedLayerNormalization node (see `_RMSNormOp`); this changes
    `model` in place.
    """
    if rmsnorm == "fused":
        log.info("RMSNorm as SimplifiedLayerNormalization: %d modules", fuse_rmsnorm(model))
    feeds = {k: torch.from_numpy(v) for k, v in static_feeds(np.zeros((1, seq_len), np.int64), mask_value).items()}
    MODELS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS, prefix=".export-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(StaticCausalLM(model), tuple(feeds[k] for k in STATIC_INPUTS), str(raw), dynamo=False,
                              input_names=list(STATIC_INPUTS), output_names=[OUTPUT], opset_version=opset,
                              custom_opsets={_PRIVATE_DOMAIN: 1})
        _to_qdq_opset(raw, Path(tmp) / "converted.onnx")
        consolidate(Path(tmp) / "converted.onnx", out)


def _to_qdq_opset(src: Path, dst: Path) -> None:
    """Convert to opset 21 (weights stay where they are), then move the fused RMSNorm into the default domain,
    where onnxruntime (CPU and QNN EP) registers SimplifiedLayerNormalization; the converter knows no schema for it."""
    model = onnx.version_converter.convert_version(onnx.load(str(src), load_external_data=False), QDQ_OPSET)
    for node in model.graph.node:
        if node.domain == _PRIVATE_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != _PRIVATE_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save_model(model, str(dst))
