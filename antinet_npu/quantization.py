"""Quantization recipes: FP32 ONNX model in, quantized ONNX model out.

CPU recipes (one function per method, one registry) feed `quantize`; the static QDQ recipe for the HTP backend
(`qdq_static`) feeds `compile`, which verifies it on the QNN backend, because onnxruntime's CPU EP is no proxy for
NPU numerics.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx

from antinet_npu.artifacts import MODELS
from antinet_npu.config import QdqRecipeConfig, RecipeConfig

log = logging.getLogger(__name__)


def fp16(src: Path, recipe: RecipeConfig) -> onnx.ModelProto:
    """Float16 weights and compute; graph inputs/outputs stay float32 when `keep_io_types`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(src)
    return convert_float_to_float16(model, keep_io_types=recipe.keep_io_types,
                                    op_block_list=recipe.op_block_list or None,
                                    node_block_list=recipe.nodes_to_exclude or None)


def dynamic_int8(src: Path, recipe: RecipeConfig) -> onnx.ModelProto:
    """onnxruntime `quantize_dynamic`: int8 weights, activations quantized per tensor at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    MODELS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS, prefix=".quantize-") as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(src, out, weight_type=getattr(QuantType, recipe.weight_type),
                         per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                         op_types_to_quantize=recipe.op_types or None,
                         nodes_to_exclude=recipe.nodes_to_exclude or None, use_external_data_format=True)
        return onnx.load(out)


def matmul_nbits(src: Path, recipe: RecipeConfig) -> onnx.ModelProto:
    """Block-wise weight-only quantization of MatMul weights into `MatMulNBits` (4 or 8 bits)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=recipe.bits, block_size=recipe.block_size,
                                     is_symmetric=recipe.symmetric,
                                     accuracy_level=recipe.accuracy_level or None,
                                     nodes_to_exclude=recipe.nodes_to_exclude or None)
    quantizer.process()
    return quantizer.model.model


METHODS: dict[str, Callable[[Path, RecipeConfig], onnx.ModelProto]] = {
    "fp16": fp16,
    "dynamic-int8": dynamic_int8,
    "matmul-nbits": matmul_nbits,
}


def quantize(src: Path, recipe: RecipeConfig) -> onnx.ModelProto:
    return METHODS[recipe.method](src, recipe)


def qdq_static(src: Path, recipe: QdqRecipeConfig, calibration: list[dict]) -> onnx.ModelProto:
    """Static QDQ for QNN: activation/weight types from the recipe, ranges calibrated on `calibration` feeds."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantType
    from onnxruntime.quantization import quantize as ort_quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            return next(self._it, None)

    config = get_qnn_qdq_config(str(src), Feeds(), calibrate_method=getattr(CalibrationMethod, recipe.calibrate_method),
                                activation_type=getattr(QuantType, recipe.activation_type),
                                weight_type=getattr(QuantType, recipe.weight_type), per_channel=recipe.per_channel,
                                activation_symmetric=recipe.activation_symmetric,
                                nodes_to_exclude=recipe.nodes_to_exclude or None)
    config.use_external_data_format = True
    MODELS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=MODELS, prefix=".qdq-") as tmp:
        out = Path(tmp) / "qdq.onnx"
        ort_quantize(str(src), str(out), config)
        return onnx.load(out)


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
