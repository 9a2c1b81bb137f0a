"""Graph passes of the CPU recipes, on small hand-made graphs (fast)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, TypeProto, helper, numpy_helper

from antinet_npu import AntinetError
from antinet_npu.build.quantization import _nbits_pass, fuse_nbits_siblings, integer_zero_points


def _siblings(sizes: tuple[int, ...], k: int, rng):
    """MatMuls of widths `sizes` reading one activation x (1, 5, k), like q/k/v."""
    weights = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), f"w{i}")
               for i, n in enumerate(sizes)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(len(sizes))]
    graph = helper.make_graph(nodes, "siblings", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 5, n])
                               for i, n in enumerate(sizes)], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("bits", [8, 4])
def test_matmuls_reading_one_input_become_one_node_over_the_same_weights(bits):
    """q/k/v-like siblings: one MatMulNBits and a Split, the very same quantized bytes, the same outputs."""
    rng = np.random.default_rng(0)
    k = 64
    model = _nbits_pass(_siblings((96, 32, 32), k, rng), bits, 32, True, 4, "rtn")
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


@pytest.mark.parametrize("fuse", [False, True])
def test_hqq_float_zero_points_become_an_integer_kernel_and_a_block_sum_term(fuse):
    """HQQ's float zero points, rewritten for onnxruntime's integer kernels: no float zero point left, the same
    product (fp32 compute on both sides: the rewrite itself is exact), fused siblings included."""
    rng = np.random.default_rng(2)
    k = 96
    model = _nbits_pass(_siblings((48, 16), k, rng), 4, 32, False, 1, "hqq")
    if fuse:
        fuse_nbits_siblings(model)
    float_zero = model.SerializeToString()
    assert integer_zero_points(model) == (1 if fuse else 2)
    inits = {i.name: i for i in model.graph.initializer}
    assert all(len(n.input) == 3 for n in model.graph.node if n.op_type == "MatMulNBits")
    assert not any(i.data_type == TensorProto.FLOAT and i.name.endswith("_zero_points") for i in inits.values())
    x = {"x": rng.standard_normal((1, 5, k)).astype(np.float32)}
    for a, b in zip(ort.InferenceSession(float_zero).run(None, x),
                    ort.InferenceSession(model.SerializeToString()).run(None, x)):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def _external_model(path):
    """ids -> embedding Gather -> MatMul -> Add -> MatMul: weights in an external-data file, as every stage saves."""
    from antinet_npu.build.onnx_models import save

    rng = np.random.default_rng(1)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("embed", (50, 16)), ("w1", (16, 24)), ("b1", (24,)), ("w2", (24, 8)))]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["h0"], name="embed_tokens/Gather"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="layers.0/mlp/up_proj/MatMul"),
             helper.make_node("Add", ["h1", "b1"], ["h2"], name="add"),
             helper.make_node("MatMul", ["h2", "w2"], ["y"], name="layers.0/mlp/down_proj/MatMul")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 8])], weights)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _full_loads(monkeypatch) -> list:
    """Records every load of a model's weights: onnx.load with its external data, or loading it afterwards."""
    import onnx
    import onnx.external_data_helper as helper_module

    calls, load, load_data = [], onnx.load, helper_module.load_external_data_for_model

    def recording(f, *args, **kwargs):
        if kwargs.get("load_external_data", True):
            calls.append(str(f))
        return load(f, *args, **kwargs)

    def recording_data(model, base_dir):
        calls.append(base_dir)
        return load_data(model, base_dir)

    monkeypatch.setattr(onnx, "load", recording)
    monkeypatch.setattr(helper_module, "load_external_data_for_model", recording_data)
    return calls


def _same_model(a_path, b_model):
    import onnx

    a = onnx.load(a_path)
    assert str(a.graph.node) == str(b_model.graph.node) and str(a.graph.value_info) == str(b_model.graph.value_info)
    b = {t.name: numpy_helper.to_array(t) for t in b_model.graph.initializer}
    for t in a.graph.initializer:
        assert numpy_helper.to_array(t).dtype == b[t.name].dtype and np.array_equal(numpy_helper.to_array(t), b[t.name])


def test_fp16_streams_the_weights_and_writes_what_the_converter_does(tmp_path, monkeypatch):
    """The path Qwen2-1.5B takes (13.2 GB -> 1.9 GB peak): the same one at any size."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from antinet_npu.build.quantization import fp16
    from antinet_npu.config import RecipeConfig

    monkeypatch.chdir(tmp_path)
    _external_model(tmp_path / "m.onnx")
    expected = convert_float_to_float16(onnx.load(tmp_path / "m.onnx"), keep_io_types=True)
    loads = _full_loads(monkeypatch)
    fp16(tmp_path / "m.onnx", RecipeConfig(method="fp16", keep_io_types=True), tmp_path / "h.onnx", [])
    assert loads == []  # never the whole model in memory
    monkeypatch.undo()
    _same_model(tmp_path / "h.onnx", expected)


def test_dynamic_int8_never_loads_the_weights_and_writes_what_onnxruntime_does(tmp_path, monkeypatch):
    """onnxruntime alone holds three copies of the weights (21.9 GB for Qwen2-1.5B); this path reads one weight at a
    time as it quantizes it (5.3 GB)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from antinet_npu.build.quantization import dynamic_int8
    from antinet_npu.config import RecipeConfig

    monkeypatch.chdir(tmp_path)
    _external_model(tmp_path / "m.onnx")
    quantize_dynamic(tmp_path / "m.onnx", tmp_path / "ref.onnx", weight_type=QuantType.QUInt8,
                     use_external_data_format=True)
    loads = _full_loads(monkeypatch)
    dynamic_int8(tmp_path / "m.onnx", RecipeConfig(method="dynamic-int8", weight_type="QUInt8"),
                 tmp_path / "q.onnx", [])
    assert loads == []  # never the whole model in memory
    monkeypatch.undo()
    _same_model(tmp_path / "q.onnx", onnx.load(tmp_path / "ref.onnx"))
    assert not list((tmp_path / "models").glob(".*")) and not list(tmp_path.glob("*inferred*"))


def _norm_and_gated_mlp(rng, k=64, inner=96, outlier=40.0):
    """x -> Mul(gain) -> q/k MatMuls; and the gated MLP: Mul(Sigmoid(x Wg), x Wu) -> down MatMul. Channel 3 of x is
    an outlier, as real LLMs have in their RMSNorm outputs."""
    w = {name: rng.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in
         (("wq", (k, k)), ("wk", (k, 16)), ("wg", (k, inner)), ("wu", (k, inner)), ("wd", (inner, k)))}
    w["gain"] = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    nodes = [helper.make_node("Mul", ["x", "gain"], ["normed"], name="norm/Mul_1"),
             helper.make_node("MatMul", ["normed", "wq"], ["q"], name="q_proj/MatMul"),
             helper.make_node("MatMul", ["normed", "wk"], ["kk"], name="k_proj/MatMul"),
             helper.make_node("MatMul", ["normed", "wg"], ["g"], name="gate_proj/MatMul"),
             helper.make_node("Sigmoid", ["g"], ["sg"], name="act"),
             helper.make_node("MatMul", ["normed", "wu"], ["u"], name="up_proj/MatMul"),
             helper.make_node("Mul", ["sg", "u"], ["p"], name="mlp/Mul"),
             helper.make_node("MatMul", ["p", "wd"], ["y"], name="down_proj/MatMul")]
    graph = helper.make_graph(nodes, "smooth", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, k])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("q", "kk", "y")],
                              [numpy_helper.from_array(v, n) for n, v in w.items()])
    x = rng.standard_normal((1, 8, k)).astype(np.float32)
    x[..., 3] *= outlier
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), x


def test_smoothing_keeps_the_float_graph_and_helps_int8_activations():
    """Scales folded into the gain and up_proj's columns: the float outputs stay (relative to their scale), the graph
    keeps its nodes, and the int8 block-wise activations of MatMulNBits lose less to the outlier channel."""
    from antinet_npu.build import smoothing

    rng = np.random.default_rng(0)
    model, x = _norm_and_gated_mlp(rng)
    sites = smoothing.find_sites(model.graph)
    assert [(s.activation, s.divide, s.weights) for s in sites] == [
        ("normed", "gain", ("wq", "wk", "wg", "wu")), ("p", "wu", ("wd",))]
    float_out = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    probe = model.__deepcopy__()
    probe.graph.output.extend(helper.make_value_info(s.activation, TypeProto()) for s in sites)
    acts = ort.InferenceSession(probe.SerializeToString()).run([s.activation for s in sites], {"x": x})
    amax = {s.activation: np.abs(a.reshape(-1, a.shape[-1])).max(0) for s, a in zip(sites, acts)}
    smoothed = model.__deepcopy__()
    assert smoothing.fold(smoothed, amax, alpha=0.5) == 2
    assert [n.op_type for n in smoothed.graph.node] == [n.op_type for n in model.graph.node]
    for a, b in zip(float_out, ort.InferenceSession(smoothed.SerializeToString()).run(None, {"x": x})):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()

    def int8_error(m) -> float:
        q = ort.InferenceSession(_nbits_pass(m.__deepcopy__(), 8, 32, True, 4, "rtn").SerializeToString())
        return max(np.abs(a - b).max() / np.abs(a).max() for a, b in zip(float_out, q.run(None, {"x": x})))

    assert int8_error(smoothed) < 0.5 * int8_error(model)
    with pytest.raises(AntinetError, match="alpha must be in"):
        smoothing.fold(smoothed, amax, alpha=1.0)


def test_smoothing_gives_a_shared_gain_a_copy_per_norm():
    """Untrained norms have identical gains, which an export may share: each smoothed norm gets its own."""
    from antinet_npu.build import smoothing

    rng = np.random.default_rng(2)
    w = {"g": np.ones(32, np.float32), **{f"w{i}": rng.standard_normal((32, 16)).astype(np.float32) for i in (1, 2)}}
    nodes = [helper.make_node("Mul", [x, "g"], [f"n{i}"], name=f"norm{i}/Mul") for i, x in ((1, "a"), (2, "b"))]
    nodes += [helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"y{i}"], name=f"proj{i}/MatMul") for i in (1, 2)]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4, 32])
                                                 for x in ("a", "b")],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in (1, 2)],
                              [numpy_helper.from_array(v, n) for n, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {x: (rng.standard_normal((1, 4, 32)) * (1 + 20 * (np.arange(32) == i))).astype(np.float32)
             for x, i in (("a", 3), ("b", 7))}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    amax = {f"n{i}": np.abs(feeds[x]).max((0, 1)) for i, x in ((1, "a"), (2, "b"))}
    assert smoothing.fold(model, amax, alpha=0.5) == 2
    gains = [n.input[1] for n in model.graph.node if n.op_type == "Mul"]
    assert len(set(gains)) == 2  # the first a copy of its own, the second the original
    for a, b in zip(before, ort.InferenceSession(model.SerializeToString()).run(None, feeds)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
