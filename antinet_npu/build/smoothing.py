"""Activation smoothing (SmoothQuant-style), folded into the float graph before block-wise int8 quantization.

MatMulNBits at accuracy_level 4 quantizes each activation row to int8 in blocks along K: one outlier channel (real
LLMs have them in the RMSNorm outputs and in the gated MLP's silu(gate) * up) flattens the rest of its block. Dividing
channel j of such an activation by s_j and multiplying row j of every weight that reads it by s_j leaves the product
unchanged and moves part of the range into the weights, which have room to spare at 8 bits. The division is folded
into what produces the activation (the RMSNorm's gain; up_proj's output columns for the down projection), so the
quantized graph has the same nodes and the same bytes as without smoothing: the same speed.
s_j = max|x_j|^alpha / max_n |W_jn|^(1 - alpha) (Xiao et al., SmoothQuant, 2023); max|x_j| over calibration windows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from antinet_npu import AntinetError
from antinet_npu.build.onnx_models import forward_feeds
from antinet_npu.signature import Signature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """An activation read only by MatMuls with constant weights, whose channels can be rescaled upstream."""

    activation: str            # the tensor the MatMuls read (their input A)
    producer: str              # the Mul node that makes it
    divide: str                # initializer the scales divide: a 1-D gain, or a (K', K) weight's output columns
    weights: tuple[str, ...]   # (K, N) MatMul weights whose rows the scales multiply
    gain_input: str = ""       # a gain: the Mul's input that carries it (the initializer, or an Identity of it)


def find_sites(graph: onnx.GraphProto) -> list[Site]:
    """RMSNorm outputs (`Mul` by a 1-D gain) and gated-MLP products (`Mul` of an activation by a linear projection),
    where every reader is a MatMul with a constant weight and nothing else reads what gets rescaled (a gain shared
    by several norms, as identical initializers may be, gets a copy of its own in `fold`)."""
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in set(n.input):
            readers.setdefault(i, []).append(n)
    sites = []
    for n in graph.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        users = readers.get(n.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[0] != n.output[0] or u.input[1] not in inits
                            or len(inits[u.input[1]].dims) != 2 for u in users):
            continue
        weights = tuple(u.input[1] for u in users)
        if any(len(readers[w]) > 1 for w in weights):  # a weight some other node reads too (tied): left alone
            continue
        # a gain is a 1-D initializer, or an Identity of one (how torch.onnx shares identical initializers)
        gains = [(i, producer[i].input[0] if i in producer and producer[i].op_type == "Identity" else i)
                 for i in n.input]
        gains = [(i, g) for i, g in gains if g in inits and len(inits[g].dims) == 1]
        ups = [producer[i] for i in n.input if i in producer and producer[i].op_type == "MatMul"
               and producer[i].input[1] in inits and len(readers[i]) == 1 and len(readers[producer[i].input[1]]) == 1]
        if gains:
            sites.append(Site(n.output[0], n.name, gains[0][1], weights, gain_input=gains[0][0]))
        elif len(ups) == 1 and not any(i in inits for i in n.input):
            sites.append(Site(n.output[0], n.name, ups[0].input[1], weights))
    return sites


def activation_max(src: Path, windows: np.ndarray, threads: int = 0) -> dict[str, np.ndarray]:
    """max |x_j| per channel of every site's activation over the calibration `windows` (count, S), one at a time,
    through an onnxruntime session over `src`'s weights (its graph with the sites as extra outputs)."""
    import onnxruntime as ort

    graph = onnx.load(src, load_external_data=False)
    sites = find_sites(graph.graph)
    if not sites:
        return {}
    graph.graph.output.extend(onnx.helper.make_value_info(s.activation, onnx.TypeProto()) for s in sites)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # from bytes, reading the weights where src keeps them: no copy of the graph on disk
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent))
    session = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    signature = Signature.read(src)
    names = [s.activation for s in sites]
    amax: dict[str, np.ndarray] = {}
    for ids in windows:
        for name, x in zip(names, session.run(names, forward_feeds(signature, ids[None]))):
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            amax[name] = np.maximum(amax[name], m) if name in amax else m
    return amax


def fold(model: onnx.ModelProto, amax: dict[str, np.ndarray], alpha: float, weights_dir: Path | None = None) -> int:
    """Rescale the sites of `model` in place; returns how many were smoothed.

    `model` may be loaded without its external data (`weights_dir`: where it is): then only the tensors smoothing
    changes are read, and they are written back into the graph. Replacing a loaded tensor instead would keep its old
    bytes alive (protobuf frees a message's memory as a whole): +3 GB at the Qwen2-1.5B shape, measured."""
    if not 0 < alpha < 1:
        raise AntinetError(f"smoothing alpha must be in (0, 1), got {alpha}")
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in set(n.input):
            readers[i] = readers.get(i, 0) + 1

    def read(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name], base_dir=str(weights_dir or ""))

    def write(name: str, value: np.ndarray) -> None:  # same name, shape and type: only the bytes change
        tensor = inits[name]
        for field in ("external_data", "float_data", "double_data", "int32_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = np.ascontiguousarray(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                                               ).tobytes()

    done = 0
    for site in find_sites(model.graph):
        if site.activation not in amax:
            continue
        weights = [read(w) for w in site.weights]
        x_max = np.maximum(amax[site.activation].astype(np.float64), 1e-5)
        w_max = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64), 1e-5)
        if x_max.shape != w_max.shape:
            continue
        s = x_max ** alpha / w_max ** (1 - alpha)
        s = (s / np.exp(np.log(s).mean())).astype(np.float32)  # geometric mean 1: the overall scale stays put
        divide = read(site.divide)
        if site.gain_input and (site.gain_input != site.divide or readers[site.divide] > 1):
            # a gain other norms share (directly or through an Identity): this norm gets its own copy
            own = f"{site.divide}/smoothed/{site.producer}"
            model.graph.initializer.append(numpy_helper.from_array(divide, own))
            inits[own] = model.graph.initializer[-1]
            if site.gain_input == site.divide:
                readers[site.divide] -= 1
            node = nodes[site.producer]
            node.input[list(node.input).index(site.gain_input)] = own
            site = Site(site.activation, site.producer, own, site.weights, own)
        write(site.divide, divide / (s if divide.ndim == 1 else s[None, :]))
        for name, w in zip(site.weights, weights):
            write(name, w * s[:, None])
        done += 1
    return done
