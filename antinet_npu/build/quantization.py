"""Quantization recipes: FP32 ONNX model in, quantized ONNX model out.

CPU recipes (one function per method, one registry) feed `quantize`; the static QDQ recipe for the HTP backend
(`qdq_static`) feeds `compile`, which verifies it on the QNN backend, because onnxruntime's CPU EP is no proxy for
NPU numerics.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import onnx

from antinet_npu import AntinetError
from antinet_npu.artifacts import MODELS, scratch_dir
from antinet_npu.build import smoothing
from antinet_npu.build.onnx_models import external_data, save, stream_weights
from antinet_npu.build.sensitivity import group_of
from antinet_npu.config import QdqRecipeConfig, RecipeConfig
from antinet_npu.config.npu import WEIGHT_ONLY_TYPES
from antinet_npu.config.recipes import NPU_KEEP_BITS

log = logging.getLogger(__name__)


def weight_groups(src: Path, op_types: tuple[str, ...] = ("MatMul", "Gather")) -> dict[str, list[str]]:
    """Layer group (see sensitivity) -> names of the nodes of `src` that apply a constant weight of that group."""
    model = onnx.load(src, load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        group = group_of(n.name)
        if group and n.op_type in op_types and any(x in weights for x in n.input):
            out.setdefault(group, []).append(n.name)
    return out


def fp16(src: Path, recipe: RecipeConfig, out: Path, keep: list[str]) -> None:
    """Float16 weights and compute; graph inputs/outputs stay float32 when `keep_io_types`.

    Streamed: onnxruntime's converter rewrites the graph loaded without its weights (there it only changes types),
    then each weight it turned to float16 is read, converted and written one at a time. Converting the loaded
    model peaked at 13.2 GB for Qwen2-1.5B (the FP32 weights, their float16 copies and the converter's temporaries).
    """
    from onnxruntime.transformers import float16

    with scratch_dir(MODELS, "quantize") as tmp:
        # Shape inference on a file: in memory, protobuf cannot serialize a model over 2 GB.
        inferred = Path(tmp) / "inferred.onnx"
        onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
        model = onnx.load(inferred, load_external_data=False)
    was_fp32 = {t.name for t in _external_tensors(model) if t.data_type == onnx.TensorProto.FLOAT}
    shape_of = float16.make_value_info_from_tensor
    # the converter reads a converted weight's data only for its shape; without the data, its dims are the shape
    float16.make_value_info_from_tensor = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
    try:
        model = float16.convert_float_to_float16(model, keep_io_types=recipe.keep_io_types, disable_shape_infer=True,
                                                 op_block_list=recipe.op_block_list or None,
                                                 node_block_list=recipe.nodes_to_exclude or None)
    finally:
        float16.make_value_info_from_tensor = shape_of

    def convert(tensor: onnx.TensorProto, blob: bytes) -> bytes:
        if tensor.name not in was_fp32 or tensor.data_type != onnx.TensorProto.FLOAT16:
            return blob  # left float32 (a blocked node's) or not a float tensor
        values = np.frombuffer(blob, np.float32)
        step = 1 << 24  # the converter's clamping makes several temporaries: bound them
        return b"".join(float16.convert_np_to_float16(values[i:i + step]).tobytes()
                        for i in range(0, values.size, step))

    stream_weights(model, src.parent, out, convert=convert)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def dynamic_int8(src: Path, recipe: RecipeConfig, out: Path, keep: list[str]) -> None:
    """onnxruntime `quantize_dynamic`: int8 weights, activations quantized per tensor at run time.

    `keep`: nodes left in float (a mixed recipe's most sensitive groups).

    Memory: onnxruntime loads the model with its weights, then (dynamic mode) re-runs shape inference through a deep
    copy, a save and a reload: three copies of the FP32 weights, 21.9 GB for Qwen2-1.5B; with one copy, 12.2 GB.
    Here it never holds a float weight it does not quantize: shape inference runs on files without weights, each
    weight is read from src's data file when it is quantized, and the result (the int8 weights in memory, the float
    ones still pointing at src's data file) is streamed into `out`.
    """
    from onnxruntime.quantization import QuantType, base_quantizer, onnx_quantizer, quantize_dynamic
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    def graph_with_shapes(path: Path) -> onnx.ModelProto:
        with scratch_dir(MODELS, "quantize") as tmp:
            onnx.shape_inference.infer_shapes_path(str(path), str(tmp / "inferred.onnx"))
            model = onnx.load(tmp / "inferred.onnx", load_external_data=False)
        add_infer_metadata(model)
        return model

    def reload_graph(model: onnx.ModelProto) -> onnx.ModelProto:
        with scratch_dir(MODELS, "quantize") as tmp:
            onnx.save(model, tmp / "model.onnx")
            return graph_with_shapes(tmp / "model.onnx")

    def weight(tensor: onnx.TensorProto) -> np.ndarray:
        return onnx.numpy_helper.to_array(tensor, base_dir=str(src.parent))

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the module, not the function
    with scratch_dir(MODELS, "quantize") as tmp:
        with ExitStack() as patches:
            for module, name, fn in ((ort_quantize, "load_model_with_shape_infer", graph_with_shapes),
                                     (onnx_quantizer, "save_and_reload_model_with_shape_infer", reload_graph),
                                     (base_quantizer, "tensor_proto_to_array", weight)):
                patches.enter_context(mock.patch.object(module, name, fn))
            quantize_dynamic(src, tmp / "model.onnx", weight_type=getattr(QuantType, recipe.weight_type),
                             per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                             op_types_to_quantize=recipe.op_types or None,
                             nodes_to_exclude=recipe.nodes_to_exclude + keep or None, use_external_data_format=True)
        # its file holds the int8 weights; the float ones still refer to src's: make both readable from `tmp`
        (tmp / external_data(src).name).symlink_to(external_data(src).resolve())
        stream_weights(onnx.load(tmp / "model.onnx", load_external_data=False), tmp, out)


def matmul_nbits(src: Path, recipe: RecipeConfig, out: Path, keep: list[str],
                 calibration: np.ndarray | None = None) -> None:
    """Block-wise weight-only quantization of MatMul weights into `MatMulNBits` (4 or 8 bits).

    With `recipe.smooth`, activation outliers are first moved into the weights (see `smoothing`), their ranges
    measured on the `calibration` windows.

    4-bit recipes may keep some MatMuls (`eight_bit_nodes`, typically the lm_head, whose errors go straight into the
    logits) at 8 bits: a second pass over just those nodes. A mixed recipe's `keep` nodes stay float, or get a pass
    of their own: 8 bits in blocks of `mixed.block_size` (with accuracy_level 4 the activations are quantized in the
    same blocks), or the recipe's bits with float compute (accuracy_level 1: activations not quantized; onnxruntime
    dequantizes the whole weight per call, ~100x slower at one token on the CPUs measured).
    """
    keep_as = recipe.mixed.keep_as if recipe.mixed else "float"
    model = _smoothed(src, recipe, calibration) if recipe.smooth else onnx.load(src)
    model = _nbits_pass(model, recipe.bits, recipe.block_size, recipe.symmetric, recipe.accuracy_level,
                        recipe.algorithm, exclude=recipe.nodes_to_exclude + recipe.eight_bit_nodes + keep)
    if recipe.eight_bit_nodes:
        model = _nbits_pass(model, 8, recipe.block_size, True, recipe.accuracy_level, "rtn",
                            include=recipe.eight_bit_nodes)
    if keep and keep_as == "8bit":
        model = _nbits_pass(model, 8, recipe.mixed.block_size or recipe.block_size, True, recipe.accuracy_level, "rtn",
                            include=keep)
    if keep and keep_as == "fp32-compute":
        model = _nbits_pass(model, recipe.bits, recipe.block_size, recipe.symmetric, 1, recipe.algorithm,
                            include=keep)
    if recipe.fuse_siblings:
        log.info("one MatMulNBits for each set of siblings: %d nodes fewer", fuse_nbits_siblings(model))
    if recipe.algorithm == "hqq":
        log.info("float zero points moved into a block-sum correction: %d MatMulNBits", integer_zero_points(model))
    save(model, out)


def _smoothed(src: Path, recipe: RecipeConfig, calibration: np.ndarray | None) -> onnx.ModelProto:
    if calibration is None or not len(calibration):
        raise AntinetError("smoothing needs calibration windows (recipe.smooth.samples >= 1)")
    amax = smoothing.activation_max(src, calibration)  # its session is gone before the weights are loaded below
    model = onnx.load(src, load_external_data=False)
    log.info("smoothing: %d activations rescaled (alpha %.2f, %d calibration windows)",
             smoothing.fold(model, amax, recipe.smooth.alpha, src.parent), recipe.smooth.alpha, len(calibration))
    # Written out and read back whole, as onnx.load hands every other recipe its model: loading the untouched weights
    # into the graph fold changed held 1.5 GB more through quantization at the Qwen2-1.5B shape (12.3 GB, measured)
    with scratch_dir(MODELS, "quantize") as tmp:
        stream_weights(model, src.parent, tmp / "smoothed.onnx")
        del model
        return onnx.load(tmp / "smoothed.onnx")


def fuse_nbits_siblings(model: onnx.ModelProto) -> int:
    """Merge MatMulNBits nodes that read the same activation with the same settings (q/k/v; gate/up) into one node
    over their weights concatenated along N, followed by a Split: the same quantized weights (blocks run along K, per
    output column), one kernel call and one activation quantization instead of three or two. Returns the number of
    nodes removed."""
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    attrs = lambda n: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    siblings: dict[tuple, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if (node.op_type == "MatMulNBits" and 3 <= len(node.input) <= 4
                and all(x in weights for x in node.input[1:])):
            key = (node.input[0], len(node.input), *(weights[x].data_type for x in node.input[1:]),
                   *sorted((k, v) for k, v in attrs(node).items() if k != "N"))
            siblings.setdefault(key, []).append(node)
    removed = 0
    for group in (g for g in siblings.values() if len(g) > 1):
        sizes = [attrs(n)["N"] for n in group]
        first = group[0]
        fused_inputs = [first.input[0]]
        for slot in range(1, len(first.input)):  # B (N, blocks, blob), scales, zero points: all N-major
            parts = [numpy_helper.to_array(weights[n.input[slot]]) for n in group]
            joined = np.concatenate([p.reshape(size, -1) for p, size in zip(parts, sizes)])
            shape = (sum(sizes), *parts[0].shape[1:]) if parts[0].ndim > 1 and parts[0].shape[0] == sizes[0] \
                else (joined.size,)
            name = f"{first.input[slot]}_fused"
            model.graph.initializer.append(numpy_helper.from_array(joined.reshape(shape), name))
            fused_inputs.append(name)
            for n in group:
                model.graph.initializer.remove(weights.pop(n.input[slot]))
        fused_out = f"{first.output[0]}_fused"
        split_sizes = f"{first.name}_fused_split"
        model.graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), split_sizes))
        at = list(model.graph.node).index(first)
        fused = onnx.helper.make_node("MatMulNBits", fused_inputs, [fused_out], name=f"{first.name}_fused",
                                      domain=first.domain, **{**attrs(first), "N": sum(sizes)})
        split = onnx.helper.make_node("Split", [fused_out, split_sizes], [n.output[0] for n in group],
                                      name=f"{first.name}_fused_split", axis=-1)
        for n in group:
            model.graph.node.remove(n)
        model.graph.node.insert(at, split)
        model.graph.node.insert(at, fused)
        removed += len(group) - 1
    return removed


def integer_zero_points(model: onnx.ModelProto) -> int:
    """Rewrite each 4-bit MatMulNBits with float zero points (HQQ's) as the same product on onnxruntime's integer
    kernels: W = (q - z)·s = (q - 8)·s + (8 - z)·s, so y = MatMulNBits(x, q, s) (no zero points: 8 implied) plus
    the block sums of x times C = (8 - z)·s, a float (K/block, N) matrix (1 bit per weight more to read). Float
    zero points take onnxruntime's dequantize-every-call path: 36 ms against 0.16 ms for one token through a
    1536 x 8960 weight on one thread (measured). Returns the number of nodes rewritten; K must be a multiple of the
    block size (it is for every model built here; others keep their float zero points, with a warning)."""
    from onnx import helper, numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    attrs = lambda n: {a.name: helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    rewritten = 0
    for node in list(model.graph.node):
        if (node.op_type != "MatMulNBits" or len(node.input) < 4 or attrs(node)["bits"] != 4
                or weights[node.input[3]].data_type == onnx.TensorProto.UINT8):
            continue
        a = attrs(node)
        k, n, block = a["K"], a["N"], a["block_size"]
        if k % block:
            log.warning("%s: K %d is not a multiple of its block %d: float zero points kept (slow)", node.name, k,
                        block)
            continue
        zero = weights.pop(node.input[3])
        scales = numpy_helper.to_array(weights[node.input[2]]).reshape(n, k // block)
        correction = ((8 - numpy_helper.to_array(zero).reshape(n, k // block)) * scales).T.astype(scales.dtype)
        model.graph.initializer.remove(zero)
        p = node.name or node.output[0]
        model.graph.initializer.extend([numpy_helper.from_array(correction, f"{p}_zero_correction"),
                                        numpy_helper.from_array(np.array([k // block, block], np.int64), f"{p}_blocks"),
                                        numpy_helper.from_array(np.array([-1], np.int64), f"{p}_last_axis")])
        x, y = node.input[0], node.output[0]
        del node.input[3]
        node.output[0] = f"{y}_int"
        at = list(model.graph.node).index(node) + 1
        for i, extra in enumerate([
            helper.make_node("Shape", [x], [f"{p}_lead"], name=f"{p}_lead", end=-1),
            helper.make_node("Concat", [f"{p}_lead", f"{p}_blocks"], [f"{p}_block_shape"], name=f"{p}_block_shape",
                             axis=0),
            helper.make_node("Reshape", [x, f"{p}_block_shape"], [f"{p}_x_blocks"], name=f"{p}_x_blocks"),
            helper.make_node("ReduceSum", [f"{p}_x_blocks", f"{p}_last_axis"], [f"{p}_x_block_sums"],
                             name=f"{p}_x_block_sums", keepdims=0),
            helper.make_node("MatMul", [f"{p}_x_block_sums", f"{p}_zero_correction"], [f"{p}_zero_term"],
                             name=f"{p}_zero_term"),
            helper.make_node("Add", [node.output[0], f"{p}_zero_term"], [y], name=f"{p}_with_zero"),
        ]):
            model.graph.node.insert(at + i, extra)
        rewritten += 1
    return rewritten


def _nbits_pass(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                algorithm: str, exclude: list[str] | None = None, include: list[str] | None = None):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    if algorithm == "hqq":  # asymmetric, float zero points; onnxruntime's implementation runs on torch
        algo = mnb.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    else:
        algo = mnb.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits,
                                                accuracy_level=accuracy_level or None)
    quantizer = mnb.MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric,
                                         accuracy_level=accuracy_level or None, nodes_to_exclude=exclude or None,
                                         nodes_to_include=include or None, algo_config=algo)
    quantizer.process()
    model = quantizer.model.model
    if algorithm == "hqq" and accuracy_level:  # onnxruntime's HQQ writer leaves accuracy_level unset (fp32 compute)
        for node in model.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
    return model


METHODS: dict[str, Callable[..., None]] = {
    "fp16": fp16,
    "dynamic-int8": dynamic_int8,
    "matmul-nbits": matmul_nbits,
}


def quantize(src: Path, recipe: RecipeConfig, out: Path, keep: list[str] | None = None,
             calibration: np.ndarray | None = None) -> None:
    """Write the variant of `src` that `recipe` describes to `out` (+ `out.data`); `keep`: node names a mixed
    recipe holds at higher precision (`recipe.mixed.keep_as`); `calibration`: token windows (count, S) for a recipe
    that smooths activations."""
    extra = {"calibration": calibration} if recipe.smooth else {}
    METHODS[recipe.method](src, recipe, out, list(keep or []), **extra)


def qdq_static(src: Path, recipe: QdqRecipeConfig, calibration: Iterable[dict], keep: list[str] | None = None,
               ranges: dict[str, tuple[float, float]] | None = None,
               outliers: dict[str, list[str]] | None = None) -> onnx.ModelProto:
    """Static QDQ for QNN: activation/weight types from the recipe, ranges calibrated on `calibration` feeds.

    `keep`: MatMul nodes kept at higher precision (`recipe.mixed.keep_as`): 16-bit or 8-bit weights (per output
    channel), or left float. With `recipe.float_residual` the residual stream stays float (see `residual_nodes`).
    `ranges`: fixed (min, max) for named tensors, in place of their calibrated ones (one encoding for a tensor that
    several graphs share: a KV cache, the hidden state between two parts). `outliers`: `outlier_nodes`' answer for
    `recipe.float_outliers` (the nodes left float)."""
    keep = list(keep or [])
    as_float = keep if recipe.mixed and recipe.mixed.keep_as == "float" else []
    excluded = recipe.nodes_to_exclude + as_float + (residual_nodes(src) if recipe.float_residual else [])
    if outliers:  # found on one graph, applied to another of the same export (AR-N's to AR-1): same node names
        names = {n.name for n in onnx.load(src, load_external_data=False).graph.node}
        if missing := sorted({x for nodes in outliers.values() for x in nodes} - names):
            raise AntinetError(f"{src.name} has no node {missing[0]} of the outlier activations found for it: "
                               "re-export the graphs together (`dvc repro export-npu-gen`)")
        excluded += [x for nodes in outliers.values() for x in nodes if x not in excluded]
    with ExitStack() as stack:
        offsets: list[str] = []
        if recipe.block_offsets:
            tmp = stack.enter_context(scratch_dir(MODELS, "offsets"))
            offsets = block_offsets(src, tmp / "offsets.onnx", recipe.block_size, set(keep) | set(excluded))
            log.info("asymmetric int4 blocks of %d: %d MatMuls with block offsets", recipe.block_size, len(offsets))
            src = tmp / "offsets.onnx"
        return _qdq_static(src, recipe, calibration, keep, ranges, as_float, excluded, offsets)


def _qdq_static(src: Path, recipe: QdqRecipeConfig, calibration: Iterable[dict], keep: list[str],
                ranges: dict[str, tuple[float, float]] | None, as_float: list[str], excluded: list[str],
                offsets: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantType
    from onnxruntime.quantization import quantize as ort_quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            return next(self._it, None)

    weight_type = getattr(QuantType, recipe.weight_type)
    overrides = _per_channel_matmul(src, weight_type) if recipe.per_channel else {}
    # the block offsets at 16 bits per output channel: 0.001 % relative error (8 bits: 0.24 %, SmolLM2-135M)
    overrides.update({name: [{"quant_type": QuantType.QInt16, "axis": 1, "symmetric": True}] for name in offsets})
    if recipe.weight_type in WEIGHT_ONLY_TYPES:  # 4 bits in the MatMul overrides only; other weights (norms) at 8
        weight_type = QuantType.QInt8
    kept_type = getattr(QuantType, NPU_KEEP_BITS[recipe.mixed.keep_as if recipe.mixed else "w16"])
    overrides.update(_per_channel_matmul(src, kept_type, only=set(keep) - set(as_float)))
    if recipe.kv_type:  # a generation graph's KV cache, in and out (static_llm names it past_*)
        overrides.update(_kv_overrides(src, getattr(QuantType, recipe.kv_type)))
    sources = _layout_sources(src) if ranges else {}
    for name, (low, high) in (ranges or {}).items():
        kind = recipe.kv_type if name.startswith("past_") and recipe.kv_type else recipe.activation_type
        fixed = [{"quant_type": getattr(QuantType, kind), "rmin": np.float32(min(low, 0.0)),
                  "rmax": np.float32(max(high, 0.0))}]
        # a layout op's output takes its input's encoding: fix the tensor the layout ops start from
        for tensor in {name, sources.get(name, name)}:
            overrides[tensor] = fixed
    config = get_qnn_qdq_config(str(src), Feeds(), calibrate_method=getattr(CalibrationMethod, recipe.calibrate_method),
                                activation_type=getattr(QuantType, recipe.activation_type),
                                weight_type=weight_type, per_channel=recipe.per_channel,
                                init_overrides=overrides or None,
                                activation_symmetric=recipe.activation_symmetric,
                                nodes_to_exclude=excluded or None)
    config.use_external_data_format = True
    with scratch_dir(MODELS, "qdq") as tmp:
        out = Path(tmp) / "qdq.onnx"
        ort_quantize(str(src), str(out), config)
        model = onnx.load(out)
    if recipe.block_size:
        log.info("int4 weights in blocks of %d: %d MatMuls", recipe.block_size,
                 int4_blocks(model, src, recipe.block_size))
    return model


def block_offsets(src: Path, out: Path, block: int, skip: set[str]) -> list[str]:
    """Write `src` as `out` with each MatMul's constant weight W (K x N; not the nodes in `skip`) on an asymmetric
    4-bit grid that HTP's symmetric blocks can carry: per block of `block` values along K, min-max with a float
    minimum m (llama.cpp's Q4_1), W = s·q + m = s·(q - 8) + c with c = m + 8s. The MatMul keeps s·(q - 8), which
    `int4_blocks` re-quantizes exactly (its extreme is -8s), and a branch adds the block sums of x times the offsets
    c (K/block x N): Reshape -> ReduceSum -> MatMul -> Add, one ReduceSum per input tensor. Returns the offsets'
    initializer names."""
    from onnx import external_data_helper, helper, numpy_helper

    model = onnx.load(src, load_external_data=False)
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *model.graph.input)}
    weights = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    targets = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights and n.name not in skip]
    for node in targets:  # before any weight is read
        if (kind := weights[node.input[1]].data_type) != onnx.TensorProto.FLOAT:
            raise AntinetError(f"{node.input[1]}: block_offsets needs float32 weights, got "
                               f"{onnx.TensorProto.DataType.Name(kind)}: quantize from the FP32 export")
    offsets, sums = [], {}
    for node in targets:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(weights[node.input[1]])
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(src.parent))
        k, n = tensor.dims
        if k % block:
            raise AntinetError(f"{node.name}: K = {k} is not a multiple of compile recipe block_size {block}: "
                               f"use a divisor of {k}")
        _, offset = _asymmetric_blocks(numpy_helper.to_array(tensor).astype(np.float32), block)
        x, y, p = node.input[0], node.output[0], node.name
        if x not in sums:  # siblings reading one x (q/k/v, gate/up) share its block sums
            if x not in ranks:
                raise AntinetError(f"{node.name}: the rank of its input {x} is unknown (shape inference)")
            sums[x] = f"{p}_x_block_sums"
            model.graph.initializer.extend([
                numpy_helper.from_array(np.array([0] * (ranks[x] - 1) + [k // block, block], np.int64),
                                        f"{p}_blocks"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{p}_last_axis")])
            model.graph.node.extend([
                helper.make_node("Reshape", [x, f"{p}_blocks"], [f"{p}_x_blocks"], name=f"{p}_x_blocks"),
                helper.make_node("ReduceSum", [f"{p}_x_blocks", f"{p}_last_axis"], [sums[x]],
                                 name=f"{p}_x_block_sums", keepdims=0)])
        model.graph.initializer.append(numpy_helper.from_array(offset, f"{p}_block_offsets"))
        offsets.append(f"{p}_block_offsets")
        node.output[0] = f"{y}_symmetric"
        model.graph.node.extend([
            helper.make_node("MatMul", [sums[x], f"{p}_block_offsets"], [f"{p}_offset_term"], name=f"{p}_offsets"),
            helper.make_node("Add", [node.output[0], f"{p}_offset_term"], [y], name=f"{p}_with_offsets")])
    _topological_sort(model.graph)
    changed = {n.input[1] for n in targets}

    def symmetric(tensor: onnx.TensorProto, blob: bytes) -> bytes:
        if tensor.name not in changed:
            return blob
        weight = np.frombuffer(blob, np.float32).reshape(tuple(tensor.dims))
        return _asymmetric_blocks(weight, block)[0].astype(np.float32).tobytes()

    stream_weights(model, src.parent, out, convert=symmetric)
    return offsets


def _asymmetric_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(s·(q - 8) as a K x N float array, c = m + 8s as K/block x N): `weight` min-max quantized per block."""
    k, n = weight.shape
    blocks = weight.reshape(k // block, block, n)
    low, high = blocks.min(1), blocks.max(1)
    step = np.where(high > low, (high - low) / 15, 1.0).astype(np.float32)
    q = np.clip(np.rint((blocks - low[:, None]) / step[:, None]), 0, 15)
    return (step[:, None] * (q - 8)).reshape(k, n), (low + 8 * step).astype(np.float32)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so every node follows the producers of its inputs (nodes appended by a rewrite)."""
    produced = {i.name for i in (*graph.input, *graph.initializer)} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise AntinetError(f"graph {graph.name}: a cycle or a missing input at {pending[0].name}")
        for node in ready:
            produced.update(node.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


def int4_blocks(model: onnx.ModelProto, src: Path, block: int) -> int:
    """Re-quantize a QDQ model's int4 MatMul weights (per output channel, as onnxruntime's quantizer emits them) in
    blocks of `block` values along K, from their float values in `src`; returns how many.

    One scale per block, the block's signed extreme / -8 (llama.cpp's Q4_0): the extreme lands exactly on -8 and
    all 16 levels are used. SmolLM2-135M, fake-quantized, lm_head at 8 bits: +19 % perplexity vs +30 % with
    |max| / 7 and +100 % per channel. HTP (v73, QNN 2.51 emulator) runs a block-wise DequantizeLinear (opset 21)
    with such scales, negative ones included, but symmetric only: it accepts int4 zero points and ignores them
    (75 % off the CPU reference, measured), so none are written."""
    from onnx import external_data_helper, numpy_helper

    floats = {t.name: t for t in onnx.load(src, load_external_data=False).graph.initializer}
    init = {t.name: t for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        quantized = init.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if quantized is None or quantized.data_type != onnx.TensorProto.INT4 or len(quantized.dims) != 2:
            continue
        source = floats[node.input[0].removesuffix("_quantized")]
        if external_data_helper.uses_external_data(source):
            external_data_helper.load_external_data_for_tensor(source, str(src.parent))
        weight = numpy_helper.to_array(source).astype(np.float32)
        k, n = weight.shape
        if k % block:
            raise AntinetError(f"{source.name}: K = {k} is not a multiple of compile recipe block_size {block}: "
                               f"use a divisor of {k}, or 0 (per channel)")
        blocks = weight.reshape(k // block, block, n)
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None, :], 1)[:, 0, :]
        scale = np.where(extreme == 0, 1.0, extreme / -8).astype(np.float32)
        ints = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8).reshape(k, n)
        quantized.CopyFrom(_int4(quantized.name, ints))
        init[node.input[1]].CopyFrom(numpy_helper.from_array(scale, node.input[1]))
        if len(node.input) > 2 and node.input[2]:
            init[node.input[2]].CopyFrom(_int4(node.input[2], np.zeros(scale.shape, np.int8)))
        node.domain = ""  # com.microsoft's DequantizeLinear has no block_size
        kept = [a for a in node.attribute if a.name not in ("axis", "block_size")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend([onnx.helper.make_attribute("axis", 0), onnx.helper.make_attribute("block_size", block)])
        source.ClearField("raw_data")
        count += 1
    for opset in model.opset_import:  # DequantizeLinear's block_size is opset 21
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    return count


def _int4(name: str, values: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer: two values per byte, the first in the low nibble (the ONNX layout)."""
    nibbles = values.reshape(-1).astype(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=values.shape)
    tensor.raw_data = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
    return tensor


LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def _layout_sources(src: Path) -> dict[str, str]:
    """For each graph output, the tensor it is a re-layout of (through Reshape/Transpose/...): the quantizer gives a
    layout op's output its input's encoding, so that is the tensor whose range decides the output's."""
    model = onnx.load(src, load_external_data=False)
    producer = {o: node for node in model.graph.node for o in node.output}
    out = {}
    for value in model.graph.output:
        name = value.name
        while name in producer and producer[name].op_type in LAYOUT_OPS:
            name = producer[name].input[0]
        out[value.name] = name
    return out


def quantized_io(model: onnx.ModelProto, keep_float: tuple[str, ...] = ()) -> dict[str, dict]:
    """Make the graph take and give quantized tensors where it quantizes them at its edges: a graph input read only
    by one QuantizeLinear becomes that Q's integer output, a graph output written by a DequantizeLinear becomes that
    DQ's integer input. Returns each such tensor's encoding {name: {scale, zero_point, dtype}}; float edges (ids,
    names starting with one of `keep_float`) stay as they are.

    The QNN EP compiles such a model into a context binary with integer I/O, as AI Hub's are: a uint16 tensor moves
    half the bytes of a float32 one per step (a uint8 KV cache a quarter), and no Q/DQ pass over the cache runs on
    either side of the call."""
    from onnx import numpy_helper

    graph = model.graph
    init = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {o: node for node in graph.node for o in node.output}
    encodings, drop = {}, []

    def encoding(node) -> dict:
        zero = numpy_helper.to_array(init[node.input[2]])
        return {"scale": float(numpy_helper.to_array(init[node.input[1]]).reshape(-1)[0]),
                "zero_point": int(zero.reshape(-1)[0]), "dtype": str(zero.dtype)}

    for value in graph.input:
        if keep_float and value.name.startswith(keep_float):
            continue
        readers = consumers.get(value.name, [])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or readers[0].input[1] not in init:
            continue
        q = readers[0]
        encodings[value.name] = encoding(q)
        for node in consumers.get(q.output[0], []):  # the DQs read the graph input, now integer
            node.input[:] = [value.name if x == q.output[0] else x for x in node.input]
        value.type.tensor_type.elem_type = init[q.input[2]].data_type
        drop.append(q)
    for value in graph.output:
        if keep_float and value.name.startswith(keep_float):
            continue
        dq = producer.get(value.name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in init:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(consumers.get(dq.input[0], [])) != 1:
            continue
        encodings[value.name] = encoding(dq)
        q.output[0] = value.name
        value.type.tensor_type.elem_type = init[dq.input[2]].data_type
        if consumers.get(value.name):  # the graph reads its own output too (a new key joins the cache): keep a DQ
            dq.input[0], dq.output[0] = value.name, f"{value.name}_dequantized"
            for node in consumers[value.name]:
                node.input[:] = [dq.output[0] if x == value.name else x for x in node.input]
        else:
            drop.append(dq)
    for node in drop:
        graph.node.remove(node)
    stale = [v for v in graph.value_info if v.name in encodings]  # their float types would contradict the edges
    for v in stale:
        graph.value_info.remove(v)
    return encodings


def _kv_overrides(src: Path, kv_type) -> dict[str, list[dict]]:
    model = onnx.load(src, load_external_data=False)
    names = [v.name for v in (*model.graph.input, *model.graph.output) if v.name.startswith("past_")]
    return {name: [{"quant_type": kv_type}] for name in names}


def residual_nodes(src: Path) -> list[str]:
    """The residual stream of a decoder graph: the Adds that carry it from the embedding to the final norm, and every
    node that reads their sums (the RMSNorms). Found by structure: from the embedding Gather's output, an Add with
    a residual input produces the next residual tensor. The embedding output itself (small, before any layer adds
    a massive activation) stays quantized: a float first RMSNorm behind it failed to finalize on HTP for the builtin
    Qwen2 (QNN_COMMON_ERROR_MEM_ALLOC).

    Real LLMs carry "massive activations" there (SmolLM2-135M: one channel near 25600 from layer 11 on); one
    16-bit scale over that range is a step of 0.4, which erases the ordinary values (~1) of every other channel.
    """
    model = onnx.load(src, load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    embedded = {n.output[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in weights}
    embedded |= {i.name for i in model.graph.input if i.name.startswith("hidden_states")}  # a later part's input
    stream: set[str] = set()
    adds, readers = [], []
    for node in model.graph.node:  # ONNX nodes are stored in topological order
        if node.op_type == "Add" and (stream | embedded).intersection(node.input):
            adds.append(node.name)
            stream.add(node.output[0])
        elif stream.intersection(node.input) and node.op_type != "MatMul":
            readers.append(node.name)
    return adds + readers


ACTIVATION_BITS = {"QUInt8": 8, "QInt8": 8, "QUInt16": 16, "QInt16": 16}


def recipe_outliers(src: Path, recipe: QdqRecipeConfig, feeds: Iterable[dict]) -> dict[str, list[str]]:
    """`outlier_nodes` at the recipe's activation bits and `float_outliers` bound; none for a recipe without one."""
    if recipe.fp16 or not recipe.float_outliers:
        return {}
    return outlier_nodes(src, feeds, ACTIVATION_BITS[recipe.activation_type], recipe.float_outliers)


def outlier_nodes(src: Path, feeds: Iterable[dict], bits: int, max_step: float) -> dict[str, list[str]]:
    """The MatMul inputs that `bits`-bit activations cannot carry: those whose quantization step over their range on
    `feeds` (MinMax, zero included) exceeds `max_step` times their median |x|. Massive activations do this: one
    value in thousands (SmolLM2-135M's layer-11 SwiGLU product: 3347, median 0.08, a 16-bit step of 0.65 medians)
    rounds the ordinary values of the whole tensor away. Returns {tensor: [the node that makes it, the MatMuls that
    read it]}, the nodes to leave float. Streams: per feed the tensor's extremes and median |x|, the median of those
    medians at the end; the weights stay where they are (the session reads them from `src`'s folder)."""
    import onnxruntime as ort

    model = onnx.load(src, load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    makers = {out: node.name for node in model.graph.node for out in node.output}
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] in makers:
            readers.setdefault(node.input[0], []).append(node.name)
    names = sorted(readers)
    if not names:
        return {}
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src.parent))
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    low, high, medians = np.zeros(len(names)), np.zeros(len(names)), [[] for _ in names]
    for feed in feeds:
        for k, x in enumerate(session.run(None, feed)):
            low[k], high[k] = min(low[k], float(x.min())), max(high[k], float(x.max()))
            medians[k].append(float(np.median(np.abs(x))))
    if not medians[0]:
        raise AntinetError(f"{src.name}: no calibration feeds to find outlier activations in")
    steps = (high - low) / (2 ** bits - 1) / np.maximum([np.median(m) for m in medians], 1e-12)
    found = {names[k]: [makers[names[k]], *readers[names[k]]] for k in np.argsort(-steps) if steps[k] > max_step}
    for k in np.argsort(-steps)[:len(found) + 2]:
        log.info("activation step %.3g x median |x| (range %.4g..%.4g): %s%s", steps[k], low[k], high[k], names[k],
                 " -> float" if names[k] in found else "")
    return found


def _per_channel_matmul(src: Path, weight_type, only: set[str] | None = None) -> dict[str, list[dict]]:
    """Per-output-channel, symmetric weight overrides for every MatMul with a constant 2-D weight (or those named
    in `only`).

    get_qnn_qdq_config's `per_channel` covers only Conv/ConvTranspose; an LLM is MatMuls, whose per-tensor 8-bit
    weights alone cost SmolLM2-135M a quarter of its top-1 agreement (0.77 vs 0.96 per-channel).
    """
    model = onnx.load(src, load_external_data=False)
    weights = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    return {n.input[1]: [{"quant_type": weight_type, "axis": 1, "symmetric": True}]
            for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights
            and (only is None or n.name in only)}


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
