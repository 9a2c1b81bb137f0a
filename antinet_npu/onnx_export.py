"""Turning a PyTorch causal LM into ONNX graphs, and the ONNX file handling every stage shares.

Every model is saved with its weights in one external-data file `<name>.onnx.data` (never one file per tensor), so
models over 2 GB work and the set of files a stage writes is always the same.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from antinet_npu import AntinetError
from antinet_npu.artifacts import MODELS, external_data

log = logging.getLogger(__name__)
INPUTS = ("input_ids", "attention_mask")
STATIC_INPUTS = ("input_ids", "attention_mask", "position_ids")
OUTPUT = "logits"


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
        save(onnx.load(raw), out)


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


def causal_mask(seq_len: int, mask_value: float) -> np.ndarray:
    """Additive causal mask (1, 1, S, S): 0 on and below the diagonal, `mask_value` above."""
    return np.triu(np.full((seq_len, seq_len), mask_value, dtype=np.float32), 1)[None, None]


def static_feeds(input_ids: np.ndarray, mask_value: float) -> dict[str, np.ndarray]:
    """Inputs of a static graph for one (1, S) window."""
    seq = input_ids.shape[-1]
    return {"input_ids": input_ids.reshape(1, seq).astype(np.int64), "attention_mask": causal_mask(seq, mask_value),
            "position_ids": np.arange(seq, dtype=np.int64)[None]}


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
        save(onnx.load(raw), out)


def save(model: onnx.ModelProto, out: Path) -> None:
    """Write `model` to `out` with all large tensors in the single file `out.data` (relative location)."""
    data = external_data(out)
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, out, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)


def check_model(path: Path) -> None:
    """Fail with a one-line error when `path` is missing or not a loadable ONNX model."""
    if not path.is_file():
        raise AntinetError(f"ONNX model {path} not found: run the stage that builds it (`dvc repro`)")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # checker and protobuf raise several types for a damaged file
        raise AntinetError(f"{path} is not a valid ONNX model ({str(exc).strip().splitlines()[0][:200]}): "
                           "delete it and re-run `dvc repro`") from None


def cpu_session(path: Path, threads: int = 0, optimization: str = "all"):
    """An onnxruntime CPU session; `threads=0` lets onnxruntime choose."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise AntinetError(f"onnxruntime cannot load {path} ({str(exc).strip().splitlines()[0][:200]}): delete it "
                           "and re-run `dvc repro`") from None


def static_seq_len(session) -> int | None:
    """The fixed sequence length of a static graph's input_ids, or None when dynamic."""
    dim = next(i for i in session.get_inputs() if i.name == "input_ids").shape[-1]
    return dim if isinstance(dim, int) else None


def run_logits(session, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    feeds = {"input_ids": input_ids.astype(np.int64)}
    if "attention_mask" in {i.name for i in session.get_inputs()}:
        feeds["attention_mask"] = (np.ones_like(input_ids) if attention_mask is None else attention_mask).astype(
            np.int64)
    return session.run([OUTPUT], feeds)[0].astype(np.float32)
