"""NPU recipes on small hand-made graphs, compiled and run on the QNN HTP backend (the emulator here; fast)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from antinet_npu import AntinetError
from antinet_npu.build import qnn
from antinet_npu.config import TargetConfig


def _embed_and_project(k: int = 128, n: int = 256, vocab: int = 64):
    """An embedding Gather and two MatMuls with constant weights: the shapes a w4a16 recipe treats differently."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((vocab, k)).astype(np.float32), "embed"),
               numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w_up"),
               numpy_helper.from_array(rng.standard_normal((n, k)).astype(np.float32), "w_down")]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["x"], name="embed_tokens"),
             helper.make_node("MatMul", ["x", "w_up"], ["h"], name="up_proj"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w_down"], ["y"], name="down_proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, k])], weights)
    feeds = [{"ids": rng.integers(0, vocab, (1, 16)).astype(np.int32)} for _ in range(4)]
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), feeds


def _compile_and_run(tmp_path, name: str, qdq: onnx.ModelProto, feeds: dict, match_cpu: bool = True):
    """Compile `qdq` into one HTP context (every node in it) and run `feeds` there and on onnxruntime's CPU QDQ
    reference: (.bin bytes, HTP output, CPU output), the two outputs asserted equal relative to the output's scale
    (`match_cpu`)."""
    import onnxruntime as ort

    onnx.save(qdq, tmp_path / f"{name}.onnx")
    qnn.compile_context(tmp_path / f"{name}.onnx", tmp_path / f"{name}_ctx.onnx", TargetConfig())
    assert qnn.nodes_outside_context(tmp_path / f"{name}_ctx.onnx")[1] == []
    size = sum(b.stat().st_size for b in qnn.context_binaries(tmp_path / f"{name}_ctx.onnx"))
    htp = qnn.session(tmp_path / f"{name}_ctx.onnx", TargetConfig()).run(None, feeds)[0]
    cpu = ort.InferenceSession(tmp_path / f"{name}.onnx", providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert not match_cpu or np.linalg.norm(htp - cpu) <= 0.02 * np.linalg.norm(cpu), name
    return size, htp, cpu


def test_w4a16_packs_matmul_weights_in_4_bits_and_htp_runs_them(tmp_path, monkeypatch):
    """weight_type QInt4: the MatMuls' weights int4 per output channel or in blocks of 32 along K, a kept group's
    int8 (keep_as w8), the embedding's table as before; all of it compiles into one HTP context, 4-bit weights really
    4-bit in the .bin, and the emulator computes what onnxruntime's CPU QDQ reference does (relative to the output's
    scale)."""
    import onnxruntime as ort

    from antinet_npu.build.quantization import qdq_static
    from antinet_npu.config import QdqRecipeConfig
    from antinet_npu.config.recipes import MixedConfig

    monkeypatch.chdir(tmp_path)
    model, feeds = _embed_and_project()
    onnx.save(model, tmp_path / "f.onnx")
    sizes, errors = {}, {}
    float_out = ort.InferenceSession(tmp_path / "f.onnx", providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    for weight_type, keep, block in (("QInt8", [], 0), ("QInt4", [], 0), ("QInt4", ["down_proj"], 0),
                                     ("QInt4", [], 32)):
        recipe = QdqRecipeConfig(activation_type="QUInt16", weight_type=weight_type, per_channel=True,
                                 block_size=block,
                                 mixed=MixedConfig(probe="w4a16", keep=len(keep), keep_as="w8") if keep else None)
        recipe.check()
        qdq = qdq_static(tmp_path / "f.onnx", recipe, iter(feeds), keep)
        bits = {i.name: i.data_type for i in qdq.graph.initializer if i.name in ("embed", "w_up", "w_down")
                or i.name.startswith(("embed_quantized", "w_up_quantized", "w_down_quantized"))}
        types = {name.split("_quantized")[0]: t for name, t in bits.items()}
        wide = TensorProto.INT4 if weight_type == "QInt4" else TensorProto.INT8
        # the Gather's table is quantized as the activations are (uint16), whatever the weights' type
        assert types == {"embed": TensorProto.UINT16, "w_up": wide,
                         "w_down": TensorProto.INT8 if keep else wide}, types
        name = f"{weight_type}-{len(keep)}" + (f"-b{block}" if block else "")
        blocked = [n for n in qdq.graph.node if any(a.name == "block_size" for a in n.attribute)]
        assert len(blocked) == (2 if block else 0)  # both MatMuls, not the embedding
        sizes[name], _, cpu = _compile_and_run(tmp_path, name, qdq, feeds[0])
        errors[name] = np.linalg.norm(cpu - float_out) / np.linalg.norm(float_out)
    # 128 x 256 + 256 x 128 weights: 32 KiB fewer at 4 bits; keeping down_proj at 8 bits gives back half of that
    assert sizes["QInt8-0"] - sizes["QInt4-0"] >= 30_000 and sizes["QInt4-0"] < sizes["QInt4-1"] < sizes["QInt8-0"]
    # blocks of 32 along K: a scale per 32 weights costs bytes, and buys fidelity
    assert sizes["QInt4-0"] < sizes["QInt4-0-b32"] < sizes["QInt8-0"]
    assert errors["QInt4-0-b32"] < errors["QInt4-0"], errors


def test_w4a16_block_offsets_carry_asymmetric_blocks_on_htp(tmp_path, monkeypatch):
    """block_offsets: weights on an asymmetric 4-bit grid (llama.cpp's Q4_1: a scale and a float minimum per block
    of 32, as SmolLM2-135M's are) come through HTP's symmetric int4 blocks plus the block-offset branch exactly, where
    symmetric blocks re-round them; every node stays in the HTP context and the emulator computes what onnxruntime's
    CPU QDQ reference does."""
    import onnxruntime as ort

    from antinet_npu.build.quantization import qdq_static
    from antinet_npu.config import QdqRecipeConfig

    monkeypatch.chdir(tmp_path)
    model, feeds = _embed_and_project()
    rng = np.random.default_rng(1)
    for tensor in model.graph.initializer[1:]:  # w_up, w_down onto a Q4_1 grid
        k, n = tensor.dims
        step, low = rng.uniform(0.05, 0.2, (k // 32, 1, n)), rng.uniform(-1.5, -0.5, (k // 32, 1, n))
        levels = rng.integers(0, 16, (k // 32, 32, n))
        levels[:, :2] = [[0], [15]]  # Q4_1's min-max: every block reaches both ends of its range
        grid = (levels * step + low).reshape(k, n).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(grid, tensor.name))
    onnx.save(model, tmp_path / "f.onnx")
    reference = ort.InferenceSession(tmp_path / "f.onnx", providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    errors, sizes = {}, {}
    for offsets in (False, True):
        recipe = QdqRecipeConfig(activation_type="QUInt16", weight_type="QInt4", per_channel=True, block_size=32,
                                 block_offsets=offsets)
        recipe.check()
        qdq = qdq_static(tmp_path / "f.onnx", recipe, iter(feeds))
        ops = [n.op_type for n in qdq.graph.node]
        assert (ops.count("ReduceSum"), ops.count("MatMul")) == ((2, 4) if offsets else (0, 2)), ops
        name = f"offsets{int(offsets)}"
        sizes[name], htp, _ = _compile_and_run(tmp_path, name, qdq, feeds[0])
        errors[name] = np.linalg.norm(htp - reference) / np.linalg.norm(reference)
    # the grid comes through: what is left is the 16-bit activations' error, a small fraction of re-rounding's
    assert errors["offsets1"] < 0.2 * errors["offsets0"], errors
    # 16-bit offsets per 32 x 1 block: about 1/8 more than the 4-bit weights' bytes, far from 8-bit weights'
    assert sizes["offsets0"] < sizes["offsets1"] < 1.5 * sizes["offsets0"], sizes


def _swiglu_with_a_massive_token(k: int = 64, n: int = 128, massive: float = 300.0):
    """x -> (x W_gate) * (x W_up) -> W_down, as an MLP computes it; token 0 of the feeds carries one large channel
    (as a real LLM's first token does), which the product turns into a massive activation (~thousands)."""
    rng = np.random.default_rng(2)
    weights = [numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), name)
               for name in ("w_gate", "w_up")]
    weights.append(numpy_helper.from_array((rng.standard_normal((n, k)) / np.sqrt(n)).astype(np.float32), "w_down"))
    nodes = [helper.make_node("MatMul", ["x", "w_gate"], ["g"], name="gate_proj"),
             helper.make_node("MatMul", ["x", "w_up"], ["u"], name="up_proj"),
             helper.make_node("Mul", ["g", "u"], ["p"], name="mul"),
             helper.make_node("MatMul", ["p", "w_down"], ["y"], name="down_proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, k])], weights)
    feeds = [{"x": rng.standard_normal((1, 16, k)).astype(np.float32)} for _ in range(4)]
    for feed in feeds:
        feed["x"][0, 0, 3] = massive
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), feeds


def test_massive_activations_are_found_from_calibration_and_kept_float_on_htp(tmp_path, monkeypatch):
    """float_outliers: a MatMul input whose 16-bit step is a large fraction of its median |x| (an MLP product
    with a massive first token) is found from the calibration feeds alone, and it, its maker and its reader stay
    float; on HTP that keeps the ordinary tokens' outputs (tokens 1..15) close to float where 16-bit quantization of
    the product rounds them away. Ordinary feeds flag nothing."""
    import onnxruntime as ort

    from antinet_npu.build.quantization import outlier_nodes, qdq_static, recipe_outliers
    from antinet_npu.config import QdqRecipeConfig

    monkeypatch.chdir(tmp_path)
    model, feeds = _swiglu_with_a_massive_token()
    onnx.save(model, tmp_path / "f.onnx")
    ordinary = [{"x": f["x"].copy()} for f in feeds]
    for feed in ordinary:
        feed["x"][0, 0, 3] = 1.0
    assert outlier_nodes(tmp_path / "f.onnx", iter(ordinary), 16, 0.1) == {}
    found = outlier_nodes(tmp_path / "f.onnx", iter(feeds), 16, 0.1)
    assert found == {"p": ["mul", "down_proj"]}, found
    reference = ort.InferenceSession(tmp_path / "f.onnx", providers=["CPUExecutionProvider"]).run(None, feeds[0])[0]
    errors = {}
    for bound in (None, 0.1):
        recipe = QdqRecipeConfig(activation_type="QUInt16", weight_type="QInt8", per_channel=True,
                                 float_outliers=bound)
        recipe.check()
        outliers = recipe_outliers(tmp_path / "f.onnx", recipe, iter(feeds))
        assert outliers == ({} if bound is None else found)
        qdq = qdq_static(tmp_path / "f.onnx", recipe, iter(feeds), outliers=outliers)
        quantized = {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
        assert ("p" in quantized) == (bound is None), quantized
        # the massive token strays from onnxruntime's CPU QDQ reference either way on HTP: 16-bit steps of its range,
        # or fp16 (a step of 4 near 7000) where it is float
        _, htp, _ = _compile_and_run(tmp_path, f"outliers-{bound}", qdq, feeds[0], match_cpu=False)
        rest = slice(1, None)  # the ordinary tokens
        errors[bound] = np.linalg.norm(htp[0, rest] - reference[0, rest]) / np.linalg.norm(reference[0, rest])
    assert errors[0.1] < 0.2 * errors[None], errors
    # outliers found on another graph must name this graph's nodes
    with pytest.raises(AntinetError, match="has no node down_proj_2"):
        qdq_static(tmp_path / "f.onnx", recipe, iter(feeds), outliers={"p": ["mul", "down_proj_2"]})
