"""ONNX model files and onnxruntime CPU sessions: what every stage shares, without importing torch.

Every model is saved with its weights in one external-data file `<name>.onnx.data` (never one file per tensor), so
models over 2 GB work and the set of files a stage writes is always the same.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from antinet_npu import AntinetError
from antinet_npu.artifacts import external_data
from antinet_npu.signature import Signature

# onnxruntime ops outside the ONNX standard but registered in its default domain (the checker does not know them)
ORT_DEFAULT_DOMAIN_OPS = ("SimplifiedLayerNormalization",)


def save(model: onnx.ModelProto, out: Path) -> None:
    """Write `model` to `out` with all large tensors in the single file `out.data` (relative location)."""
    data = external_data(out)
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, out, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)


def consolidate(raw: Path, out: Path, size_threshold: int = 1024) -> None:
    """Rewrite the exporter's `raw` model as `out` + one `out.data`, one tensor at a time.

    The TorchScript exporter writes a model over 2 GB with one file per tensor; `onnx.load` + `save` would hold all
    the weights in memory next to the PyTorch model (2 x 6 GB for Qwen2-1.5B). Copying tensor by tensor does not.
    """
    stream_weights(onnx.load(str(raw), load_external_data=False), raw.parent, out, size_threshold)


def stream_weights(model: onnx.ModelProto, src_dir: Path, out: Path, size_threshold: int = 1024,
                   convert: Callable[[onnx.TensorProto, bytes], bytes] | None = None) -> None:
    """Write `model` (loaded without its external data, which lives under `src_dir`) as `out` + one `out.data`,
    reading, optionally converting (`convert(tensor, bytes) -> bytes`) and writing one tensor at a time: the
    weights are never all in memory."""
    from onnx.external_data_helper import _get_all_tensors

    data = external_data(out)
    with open(data, "wb") as sink:
        for tensor in _get_all_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                with open(src_dir / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    blob = src.read(int(info["length"])) if "length" in info else src.read()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= size_threshold:
                blob = tensor.raw_data
            else:
                continue
            if convert is not None:
                blob = convert(tensor, blob)
            sink.seek((sink.tell() + 4095) // 4096 * 4096)  # page-aligned, as onnx's own writer does
            offset = sink.tell()
            sink.write(blob)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", len(blob))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del blob
    onnx.save_model(model, str(out))


def share_weights(models: list[Path], data: Path) -> None:
    """Point `models`, whose weight files are byte-identical (a generation part's AR-N and AR-1 graphs), at one file
    `data` and delete the copies: at Qwen2-1.5B that is 7 GB of disk less. Different weights are an error."""
    files = [external_data(m) for m in models]
    first = files[0]
    for other in files[1:]:
        if not _same_bytes(first, other):
            raise AntinetError(f"{other.name} and {first.name} should hold the same weights but differ: the exporter "
                               "named or ordered them differently; report it with both graphs")
    first.rename(data)
    for model_path, other in zip(models, files):
        model = onnx.load(str(model_path), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data.name
        onnx.save_model(model, str(model_path))
        other.unlink(missing_ok=True)


def _same_bytes(a: Path, b: Path, chunk: int = 1 << 24) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x = fa.read(chunk)
            if x != fb.read(chunk):
                return False
            if not x:
                return True


def check_model(path: Path) -> None:
    """Fail with a one-line error when `path` is missing, not a loadable ONNX model, or its weights file is shorter
    than the tensors it should hold (the checker does not look at external data)."""
    if not path.is_file():
        raise AntinetError(f"ONNX model {path} not found: run the stage that builds it (`dvc repro`)")
    _check_external_data(path)
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # checker, protobuf and file errors: a damaged file, unless it is onnxruntime's own op
        if isinstance(exc, onnx.checker.ValidationError) and any(
                f"No Op registered for {op} " in str(exc) for op in ORT_DEFAULT_DOMAIN_OPS):
            return
        raise AntinetError(f"{path} is not a valid ONNX model ({str(exc).strip().splitlines()[0][:200]}): "
                           "delete it and re-run `dvc repro`") from None


def _check_external_data(path: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors of a damaged file
        raise AntinetError(f"{path} is not a valid ONNX model ({str(exc).strip().splitlines()[0][:200]}): delete "
                           "it and re-run `dvc repro`") from None
    sizes: dict[str, int] = {}
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        data = path.parent / info.get("location", "")
        if data.name not in sizes:
            sizes[data.name] = data.stat().st_size if data.is_file() else -1
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if sizes[data.name] < end:
            found = "missing" if sizes[data.name] < 0 else \
                f"{sizes[data.name]} bytes, tensor {tensor.name} ends at {end}"
            raise AntinetError(f"{data} is damaged or incomplete ({found}): delete {path.name} and its data and "
                               "re-run the stage that built it (`dvc repro`)")


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


def forward_feeds(signature: Signature, input_ids: np.ndarray,
                  attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The feeds of one forward pass over (batch, S) ids, with an empty KV cache when the graph has one."""
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
    if "position_ids" in signature.inputs:  # as transformers numbers a left-padded row: from its first real token
        feeds["position_ids"] = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None).astype(np.int64)
    if signature.kv is not None:
        feeds.update(signature.kv.empty(input_ids.shape[0]))
    return feeds


def run_logits(session, signature: Signature, input_ids: np.ndarray,
               attention_mask: np.ndarray | None = None) -> np.ndarray:
    """One forward pass over (batch, S) ids (empty KV cache when the graph has one) -> float32 logits."""
    return session.run(["logits"], forward_feeds(signature, input_ids, attention_mask))[0].astype(np.float32)
