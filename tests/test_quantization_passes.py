"""Graph passes of the CPU recipes, on small hand-made graphs (fast)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from antinet_npu.quantization import _nbits_pass, fuse_nbits_siblings


@pytest.mark.parametrize("bits", [8, 4])
def test_matmuls_reading_one_input_become_one_node_over_the_same_weights(bits):
    """q/k/v-like siblings: one MatMulNBits and a Split, the very same quantized bytes, the same outputs."""
    rng = np.random.default_rng(0)
    sizes, k = (96, 32, 32), 64
    weights = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}")
               for i, n in enumerate(sizes)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(3)]
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 5, n])
                               for i, n in enumerate(sizes)], weights)
    model = _nbits_pass(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), bits, 32, True, 4,
                        "rtn")
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    separate = model.SerializeToString()
    assert fuse_nbits_siblings(model) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits", "Split"]
    fused = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    packed = next(n for n in fused if n.endswith("_fused") and fused[n].dtype == np.uint8)
    assert np.array_equal(fused[packed], np.concatenate([before[n] for n in sorted(before)
                                                         if before[n].dtype == np.uint8]))
    x = {"x": rng.standard_normal((1, 5, k)).astype(np.float32)}
    out_separate = ort.InferenceSession(separate).run(None, x)
    out_fused = ort.InferenceSession(model.SerializeToString()).run(None, x)
    for a, b in zip(out_separate, out_fused):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4 * np.abs(a).max()
