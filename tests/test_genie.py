"""Genie, Qualcomm's LLM runtime: the graph contract it needs, the bundle stage `genie` writes, Genie itself running it
on the HTP emulator, the `genie` backend, and the bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import qnn
from antinet_npu.runtime import genie
from antinet_npu.signature import Signature
from conftest import TEST_OVERRIDES, clone_project, error_line, run_cli

PRECISION, AR, CL, PARTS = "w8a16", 32, 256, 2
ONNX_TYPE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT32: "int32", onnx.TensorProto.UINT16: "uint16"}


def _bundle(project):
    return project / artifacts.genie_dir("tiny-qwen2", PRECISION)


def _io(graph) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {v.name: (ONNX_TYPE[v.type.tensor_type.elem_type], tuple(d.dim_value for d in v.type.tensor_type.shape.dim))
            for v in graph}


@pytest.mark.slow
@pytest.mark.parametrize("verify", [False, True], ids=["shipped", "unshared"])
def test_graph_contract_read_back_from_the_built_binaries(pipeline, verify):
    """AI Hub's (= Genie's) I/O, quantized (uint16 but the int32 ids), part boundaries named alike on both sides with
    one encoding, and graph names `<kind>_ar<AR>_cl<CL>_<i>_of_<n>` inside the context binaries, read from what
    compile-gen built (wrappers, their signatures, binaries)."""
    folder = pipeline.path / artifacts.qnn_gen_dir("tiny-qwen2", PRECISION)
    kv_heads, head_dim, hidden, vocab = 2, 32, 192, 2048
    q = "uint16"
    shared: dict = {}
    for ar in (AR, 1):
        past = CL - ar
        boundary = None
        for i in range(PARTS):
            ctx = artifacts.qnn_gen_ctx(folder, ar, i, verify=verify)
            model = onnx.load(ctx, load_external_data=False)
            inputs, outputs = _io(model.graph.input), _io(model.graph.output)
            first = (0, 1) if i == 0 else (2, 3)
            expected_in = {("input_ids" if i == 0 else f"hidden_states_{first[0]}"):
                           ("int32", (1, ar)) if i == 0 else (q, (1, ar, hidden)),
                           "attention_mask": (q, (1, 1, ar, CL)),
                           "position_ids_cos": (q, (1, 1, ar, head_dim // 2)),
                           "position_ids_sin": (q, (1, 1, ar, head_dim // 2))}
            for layer in first:
                expected_in[f"past_key_{layer}_in"] = (q, (kv_heads, 1, head_dim, past))  # keys transposed
                expected_in[f"past_value_{layer}_in"] = (q, (kv_heads, 1, past, head_dim))
            assert inputs == expected_in
            head = ("logits", (q, (1, ar, vocab))) if i == PARTS - 1 else \
                (f"hidden_states_{first[1] + 1}", (q, (1, ar, hidden)))
            assert list(outputs.items())[0] == head
            for layer in first:
                assert outputs[f"past_key_{layer}_out"] == (q, (kv_heads, 1, head_dim, ar))
                assert outputs[f"past_value_{layer}_out"] == (q, (kv_heads, 1, ar, head_dim))
            # one encoding per tensor that graphs share (what Genie requires, and what lets the cache pass as bytes)
            encodings = Signature.read(ctx).quantized_io
            assert set(encodings) == {n for n, (t, _) in {**inputs, **outputs}.items() if t == q}
            for name, e in encodings.items():
                if name != "logits":
                    key = name.removesuffix("_in").removesuffix("_out")
                    assert shared.setdefault(key, e) == e, name
            if boundary is not None:  # the tensor between two parts carries one name on both sides
                assert boundary in inputs
            boundary = head[0]
            kind = "prompt" if ar > 1 else "token"
            name = f"{kind}_ar{ar}_cl{CL}_{i + 1}_of_{PARTS}"
            assert [n.name for n in model.graph.node if n.op_type == "EPContext"] == [name]
            (binary,) = qnn.context_binaries(ctx)
            assert name in qnn.graph_names(binary)
            assert b"QNNExecutionProvider_" not in binary.read_bytes()  # the EP's hash names are all gone


@pytest.mark.slow
def test_the_fp16_parts_are_the_float_reference_and_genie_runs_their_bundle(pipeline):
    """compile.recipes.fp16: no quantization, the FP32 parts at fp16 on HTP with float32 I/O. Our host loop over its
    binaries follows the FP32 parts; Genie runs its bundle (how closely: recorded, see the README)."""
    built = json.loads((pipeline.path / "metrics/compile-gen/fp16.json").read_text())
    assert (built["method"], built["activation_type"], built["quantized_io"]) == ("fp16", "float16", False)
    assert built["top1_agreement"] >= 0.99 and built["gen_agreement"] >= 0.9 and built["gate_passed"] is True
    m = json.loads((pipeline.path / "metrics/genie/fp16.json").read_text())
    assert m["emulated"] is True and m["gen_prompts"] == 4 and m["gate_passed"] is True
    assert 0.5 <= m["genie_host_agreement"] <= 1 and 0 <= m["genie_fp32_agreement"] <= 1


@pytest.mark.slow
def test_bundle_is_laid_out_as_ai_hub_ships_it_and_genie_runs_it_as_our_host_loop(pipeline):
    assert "genie@w8a16" in pipeline.first_run
    m = json.loads((pipeline.path / "metrics/genie/w8a16.json").read_text())
    assert m["emulated"] is True and m["backend"] == "genie" and m["genie_api_version"].startswith("1.")
    assert m["genie_host_agreement"] == 1.0 and m["genie_prompts_equal_host"] == m["gen_prompts"] == 4
    assert 0 <= m["genie_fp32_agreement"] <= 1 and m["gate_passed"] is True
    assert m["graphs_in_order"] == 2 * PARTS and m["qnn_sdk_version"].startswith("v2.51")
    bundle = _bundle(pipeline.path)
    assert sorted(p.name for p in bundle.iterdir()) == sorted([
        "bundle.json", "emulator_check.json", "genie_config.emulator.json", "genie_config.json",
        "htp_backend_ext_config.emulator.json", "htp_backend_ext_config.json", "tokenizer.json",
        "weight_sharing_model_1_of_2.serialized.bin", "weight_sharing_model_2_of_2.serialized.bin"])
    config = json.loads((bundle / "genie_config.json").read_text())["dialog"]
    assert config["context"] == {"version": 1, "size": CL, "n-vocab": 2048, "bos-token": -1, "eos-token": [0],
                                 "pad-token": 0}
    htp = config["engine"]["backend"]["QnnHtp"]
    assert (htp["kv-dim"], htp["pos-id-dim"], htp["rope-theta"], htp["use-mmap"]) == (32, 16, 10000.0, True)
    assert config["sampler"]["top-k"] == 1  # greedy
    assert config["engine"]["model"]["binary"]["ctx-bins"] == ["weight_sharing_model_1_of_2.serialized.bin",
                                                              "weight_sharing_model_2_of_2.serialized.bin"]
    ext = json.loads((bundle / "htp_backend_ext_config.json").read_text())
    assert ext["devices"][0]["soc_model"] == 60 and ext["devices"][0]["dsp_arch"] == "v73"
    assert ext["context"]["weight_sharing_enabled"] is True
    # the shipped binaries are compile-gen's shared ones, byte for byte
    folder = pipeline.path / artifacts.qnn_gen_dir("tiny-qwen2", PRECISION)
    for i in range(PARTS):
        (shared,) = qnn.context_binaries(artifacts.qnn_gen_ctx(folder, AR, i))
        assert (bundle / genie.binary_name(i, PARTS)).read_bytes() == shared.read_bytes()
    manifest = genie.GenieBundle.read(bundle)
    assert manifest.graphs == ("prompt_ar32_cl256_1_of_2", "prompt_ar32_cl256_2_of_2", "token_ar1_cl256_1_of_2",
                               "token_ar1_cl256_2_of_2")
    # Genie's tokens are our host loop's over the same binaries (compile-gen's record)
    check = json.loads((bundle / "emulator_check.json").read_text())
    host = json.loads(artifacts.qnn_gen_greedy(folder).read_text())["host"]
    assert check["genie"] == [t[:t.index(0)] if 0 in t else t for t in host]  # Genie stops at EOS (id 0)


@pytest.mark.slow
def test_a_genie_driver_that_is_not_ours_generates_the_checked_tokens(pipeline, tmp_path):
    """Plain C against libGenie's C API, started in the bundle folder on its emulator config, as genie-t2t-run is."""
    driver = tmp_path / "genie_driver"
    subprocess.run(["gcc", "-O1", "-o", str(driver), str(pipeline.path / "tests/genie_driver.c"), "-ldl"], check=True)
    bundle = _bundle(pipeline.path)
    check = json.loads((bundle / "emulator_check.json").read_text())
    for prompt, expected in list(zip(check["prompts"], check["genie"]))[:2]:
        proc = subprocess.run([str(driver), str(genie.library_path()), "genie_config.emulator.json",
                               str(check["new_tokens"]), *map(str, prompt)], cwd=bundle, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert [int(t) for t in proc.stdout.strip().splitlines()[-1].split()] == expected


@pytest.mark.slow
def test_genie_backend_generates_in_bench_gen_labelled_emulated(pipeline):
    m = json.loads((pipeline.path / "metrics/bench-gen/genie-w8a16.json").read_text())
    assert m["backend"] == "genie" and m["emulated"] is True and m["binaries"] == "unshared (compile-gen verify/)"
    assert m["p32"]["new_tokens"] == 16 and m["p32"]["decode_tokens_per_s"] > 0 and m["p32"]["ttft_ms"] > 0
    summary = (pipeline.path / "reports/summary.md").read_text()
    assert "| genie-w8a16 | genie (emulated) |" in summary


@pytest.mark.slow
def test_damaged_or_foreign_bundles_are_one_line_errors(pipeline, tmp_path):
    project = clone_project(pipeline.path, tmp_path / "p")
    run = ("bench-gen", "--run", "genie-w8a16", *TEST_OVERRIDES)
    line = error_line(run_cli(project, *run, "target.soc_model=57"), "bench-gen")
    assert "compiled for soc_model 60, the target is 57" in line
    line = error_line(run_cli(project, *run, "compile.generation.context_length=128"), "bench-gen")
    assert "was built for AR-32, context 256, 2 parts" in line and "dvc repro genie" in line
    binary = _bundle(project) / genie.binary_name(1, PARTS)
    binary.write_bytes(binary.read_bytes()[:1000])
    line = error_line(run_cli(project, *run), "bench-gen")
    assert f"{binary.relative_to(project)} is damaged" in line and "dvc repro genie" in line
    binary.unlink()
    line = error_line(run_cli(project, *run), "bench-gen")
    assert "is missing from the Genie bundle" in line
    # a truncated unshared binary: Genie itself refuses it, and says so in one line
    unshared = artifacts.qnn_gen_ctx(project / artifacts.qnn_gen_dir("tiny-qwen2", PRECISION), 1, 0, verify=True)
    (binary_in,) = qnn.context_binaries(unshared)
    binary_in.write_bytes(binary_in.read_bytes()[:4096])
    before = sorted(p.name for p in _bundle(project).iterdir())
    line = error_line(run_cli(project, "genie", "--precision", PRECISION), "genie")
    assert line.startswith("antinet-npu genie: error: Genie could not create the dialog:"), line
    assert sorted(p.name for p in _bundle(project).iterdir()) == before  # nothing half-written over the bundle


@pytest.mark.slow
def test_no_genie_runtime_names_the_extra(pipeline, tmp_path):
    blocker = tmp_path / "block" / "onnxruntime_qnn"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "block")}
    proc = subprocess.run([sys.executable, "-m", "antinet_npu", "genie", "--precision", PRECISION],
                          cwd=pipeline.path, env=env, capture_output=True, text=True)
    assert "Genie (libGenie) ships in onnxruntime-qnn, which is not installed: install the qnn extra" in \
        error_line(proc, "genie")
    line = error_line(run_cli(pipeline.path, "genie", "--precision", "w8a8"), "genie")
    assert "no Genie bundle is built at 'w8a8': genie.precisions has" in line


def test_runtime_of_another_qnn_version_or_soc_is_refused():
    bundle = genie.GenieBundle(model="m", precision="w8a16", context_length=256, prefill_len=32, parts=2, n_vocab=10,
                               bos_token=-1, eos_tokens=(0,), pad_token=0, kv_dim=32, rope_theta=1e4, soc_model=60,
                               dsp_arch="v73",
                               qnn_sdk_version="v2.51.0.260929181845", graphs=())
    bundle.check_runtime(60, "2.51.0")
    bundle.check_runtime(60, None)  # a runtime that does not say: Genie's own error is the last word
    with pytest.raises(AntinetError, match=r"compiled with QNN v2.51.0.260929181845 but the runtime is QNN 2.42.0 .*"
                                           "error 5000"):
        bundle.check_runtime(60, "2.42.0")
    with pytest.raises(AntinetError, match="compiled for soc_model 60, the target is 57"):
        bundle.check_runtime(57, "2.51.0")


def test_a_tokenizer_without_the_named_special_tokens_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"added_tokens": [{"id": 5, "content": "<eos>"}], "model": {"vocab": {"a": 0, "b": 1}}}))
    genie.check_special_tokens(path, [5, 0])
    with pytest.raises(AntinetError, match="has no token with id 7, which the Genie dialog names as bos/eos/pad"):
        genie.check_special_tokens(path, [5, 7])


def _word_tokenizer(path, single: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "Hello": 2, "world": 3}, unk_token="<s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 0), ("</s>", 1)])
    tokenizer.save(str(path))
    return path


def test_bundle_bos_is_what_the_tokenizer_prepends(tmp_path):
    # Genie prepends a bos-token >= 0 to every first query: a tokenizer that adds none (Qwen2, SmolLM2) gets -1
    assert genie.prepended_bos(_word_tokenizer(tmp_path / "none.json", "$A")) == -1
    assert genie.prepended_bos(_word_tokenizer(tmp_path / "bos.json", "<s> $A")) == 0
    with pytest.raises(AntinetError, match="adds special tokens other than one leading BOS"):
        genie.prepended_bos(_word_tokenizer(tmp_path / "both.json", "<s> $A </s>"))
    # a caller's prompt ids already carry the tokenizer's BOS: the dialog it runs never prepends another
    config = {"dialog": {"context": {"bos-token": 0}}}
    assert genie.for_whole_prompts(config)["dialog"]["context"]["bos-token"] == -1
    assert config["dialog"]["context"]["bos-token"] == 0


def _tiny_context(folder):
    """A one-MatMul QDQ model compiled to a context binary by the QNN EP (the emulator here)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from antinet_npu.config import TargetConfig

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), folder / "f.onnx")

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize(str(folder / "f.onnx"), str(folder / "q.onnx"),
             get_qnn_qdq_config(str(folder / "f.onnx"), Feeds(), activation_type=QuantType.QUInt16,
                                weight_type=QuantType.QUInt8))
    qnn.compile_context(folder / "q.onnx", folder / "q_ctx.onnx", TargetConfig(), allow_cpu_fallback=True)
    return folder / "q_ctx.onnx"


def test_graph_names_are_rewritten_in_place_and_the_qnn_ep_still_runs_the_binary(tmp_path):
    """`qnn.name_graphs`, the one place that renames a graph inside a QNN context binary (the QNN EP names graphs by
    a hash; Genie orders parts by name)."""
    from antinet_npu.config import TargetConfig

    ctx = _tiny_context(tmp_path)
    (binary,) = qnn.context_binaries(ctx)
    old = [n.name for n in onnx.load(ctx).graph.node if n.op_type == "EPContext"][0]
    assert old.startswith("QNNExecutionProvider_")
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    before = qnn.session(ctx, TargetConfig()).run(None, {"x": x})[0]
    size = binary.stat().st_size
    qnn.name_graphs({ctx: "token_ar1_cl64_1_of_1"})
    assert binary.stat().st_size == size and old.encode() not in binary.read_bytes()
    assert qnn.graph_names(binary) == ["token_ar1_cl64_1_of_1"]
    after = qnn.session(ctx, TargetConfig()).run(None, {"x": x})[0]
    assert np.array_equal(before, after)
    with pytest.raises(AntinetError, match="does not hold graph"):  # renamed once already: the old name is gone
        qnn.name_graphs({_copy_with_node_name(ctx, tmp_path, old): "x_1_of_1"})
    with pytest.raises(AntinetError, match="longer than the QNN EP's"):
        qnn.name_graphs({ctx: "n" * 200})


def _copy_with_node_name(ctx, tmp_path, name):
    model = onnx.load(ctx)
    for node in model.graph.node:
        if node.op_type == "EPContext":
            node.name = name
    out = tmp_path / "again_ctx.onnx"
    onnx.save(model, out)
    return out


@pytest.mark.slow
def test_serve_speaks_openai_over_a_genie_dialog_and_answers_as_the_npu_parts_do(pipeline):
    """`serve.run` names a generation run: the Genie bundle (its dialog, its greedy sampler), or the same NPU parts
    through our host loop; on the builtin model both answer a greedy completion with the same text."""
    import contextlib

    import numpy as np
    from test_serve import Server

    from antinet_npu.config import load
    from antinet_npu.runtime import generation
    from antinet_npu.runtime.backends.registry import open_run

    body = {"prompt": "Return the number of items in", "max_tokens": 8, "temperature": 0}
    answers = {}
    for run in ("genie-w8a16", "qnn-htp-w8a16"):
        server = Server(pipeline.path, f"serve.run={run}", "serve.warmup=1")
        try:
            health = server.wait_ready(timeout=300)
            assert health["status"] == "ready", health
            assert health["backend"] == ("genie" if run.startswith("genie") else "qnn-htp") and health["emulated"]
            status, answer = server.request("/v1/completions", body)
            assert status == 200, answer
            answers[run] = answer["choices"][0]["text"]
            if run == "genie-w8a16":
                kind, events = server.stream("/v1/chat/completions", {
                    "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True,
                    "stream_options": {"include_usage": True}})
                assert kind.startswith("text/event-stream") and events[-1] == "[DONE]"
                assert events[-2]["usage"]["completion_tokens"] >= 1
                status, answer = server.request("/v1/completions", {**body, "temperature": 0.7})
                assert status == 422 and "own sampler (greedy)" in answer["detail"]
                status, answer = server.request("/api/infer", {"text": "x", "max_new_tokens": 1})
                assert status == 422 and "gives no logits" in answer["detail"]
            else:  # the prefix cache over the NPU parts' slots: a second turn resumes, and answers as a fresh session
                history = [(7 * k) % 1900 + 3 for k in range(90)]
                status, first = server.request("/api/infer", {"token_ids": history, "max_new_tokens": 6})
                turn = history + first["continuation"]["token_ids"] + [11, 12]
                status, second = server.request("/api/infer", {"token_ids": turn, "max_new_tokens": 6})
                assert status == 200 and second["cached_tokens"] == len(history) + 5, second
                with contextlib.chdir(pipeline.path):  # artifacts (parts load with the session) are project-relative
                    backend, _ = open_run(load("params.yaml"), run)
                    try:
                        fresh = list(generation.generate(backend.stepper(), np.array(turn), 6))
                    finally:
                        backend.close()
                assert second["continuation"]["token_ids"] == fresh, (second, fresh)
                print(f"NPU parts (emulated): second turn of {len(turn)} tokens, first forward "
                      f"{second['first_forward_ms']:.0f} ms resumed vs {first['first_forward_ms']:.0f} ms cold "
                      f"for {len(history)} tokens")
        finally:
            server.stop()
    assert answers["genie-w8a16"] == answers["qnn-htp-w8a16"] and answers["genie-w8a16"]


def test_quantized_io_keeps_the_arithmetic_and_a_graph_that_reads_its_own_output():
    """`quantization.quantized_io`: the edges' Q/DQ move to the host (integer graph inputs and outputs), including an
    output the graph also reads (a new key joins the cache), and the host's quantize/dequantize with the returned
    encodings gives back the QDQ model's own numbers."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from antinet_npu.build import quantization, static_llm
    from antinet_npu.signature import ADDITIVE_MASK

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Add", ["y", "x"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8])], [weight])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        src, qdq = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), src)

        class Feeds(CalibrationDataReader):
            def __init__(self):
                self.it = iter([{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(8)])

            def get_next(self):
                return next(self.it, None)

        quantize(str(src), str(qdq), get_qnn_qdq_config(str(src), Feeds(), activation_type=QuantType.QUInt16,
                                                        weight_type=QuantType.QUInt8))
        model = onnx.load(qdq)
        reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        encodings = quantization.quantized_io(model)
        assert set(encodings) == {"x", "y", "z"} and all(e["dtype"] == "uint16" for e in encodings.values())
        assert {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)} == {
            "x": TensorProto.UINT16, "y": TensorProto.UINT16, "z": TensorProto.UINT16}
        stripped = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    signature = Signature(inputs=("x",), outputs=("y", "z"), mask=ADDITIVE_MASK, context_length=1,
                          quantized_io=encodings)
    run = static_llm.quantized_edges(signature, lambda feeds: stripped.run(None, feeds))
    x = rng.standard_normal((1, 8)).astype(np.float32)
    expected, got = reference.run(None, {"x": x}), run({"x": x})
    for a, b in zip(expected, got):
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()


class _FakeGenieContext:
    """AppBuilder's documented LLM API (`qai_appbuilder.GenieContext`: text in, text per token out), played by the
    wheel's libGenie on the config file it is handed: no Windows on Snapdragon here."""

    calls: list = []

    def __init__(self, config: str):
        from tokenizers import Tokenizer

        self.calls.append(("GenieContext", config))
        spec = json.loads(open(config).read())
        self.tokenizer = Tokenizer.from_file(spec["dialog"]["tokenizer"]["path"])
        self.dialog, self.max_length = genie.Dialog(spec), None

    def SetParams(self, max_length: str, temp: str, top_k: str, top_p: str) -> bool:
        self.calls.append(("SetParams", max_length, temp, top_k, top_p))
        self.max_length = int(max_length)
        return True

    def Query(self, prompt: str, callback) -> str:
        self.calls.append(("Query", prompt))
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        out = self.dialog.generate(ids, self.max_length)
        pieces = [self.tokenizer.decode([t], skip_special_tokens=False) for t in out.tokens]
        for piece in pieces:
            if callback(piece) is False:
                break
        return "".join(pieces)

    def Stop(self) -> bool:
        self.calls.append(("Stop",))
        return True


@pytest.mark.slow
def test_appbuilder_genie_context_runs_the_bundle_through_its_documented_api(pipeline, monkeypatch):
    from antinet_npu import config
    from antinet_npu.runtime.backends.genie import GenieBackend

    def compose_config(project, *overrides):
        return config.validate(config.compose([*TEST_OVERRIDES, *overrides], project / "conf"), source="test")

    monkeypatch.chdir(pipeline.path)
    cfg = compose_config(pipeline.path, "genie.runtime=appbuilder")
    line = pytest.raises(AntinetError, GenieBackend(cfg, "default").load, _bundle(pipeline.path)).value
    assert str(line) == f"genie.runtime=appbuilder: AppBuilder's GenieContext runs only on Windows on Snapdragon " \
                        f"(this is {sys.platform})"
    module = type(sys)("qai_appbuilder")
    module.GenieContext = _FakeGenieContext
    monkeypatch.setitem(sys.modules, "qai_appbuilder", module)
    monkeypatch.setattr(genie, "appbuilder_reason", lambda: None)
    _FakeGenieContext.calls = []
    backend = GenieBackend(compose_config(pipeline.path), "default")  # auto: AppBuilder where it is installed
    backend.load(_bundle(pipeline.path))
    config_file = backend.dialog.config_path
    greedy = json.loads(artifacts.qnn_gen_greedy(pipeline.path / artifacts.qnn_gen_dir("tiny-qwen2", PRECISION))
                        .read_text())
    prompt, host = greedy["prompts"][0], greedy["host"][0]
    tokens, ttft, decode, _ = backend.timed_generate(np.asarray(prompt), 8)
    assert backend.describe()["genie_runtime"] == "appbuilder"
    backend.dialog.abort()
    backend.close()
    assert not config_file.exists()  # the resolved config it handed AppBuilder is gone with the dialog
    assert [c[0] for c in _FakeGenieContext.calls] == ["GenieContext", "SetParams", "Query", "Stop"]
    assert _FakeGenieContext.calls[1] == ("SetParams", "8", "1.0", "1", "1.0")
    assert _FakeGenieContext.calls[0][1] == str(config_file)
    # the prompt and each streamed piece cross AppBuilder's API as text: the builtin tokenizer round-trips them
    assert tokens == host[:8] and ttft > 0 and len(decode) == 7
