"""The NPU's generation graphs (static_llm): AR-N / AR-1 parts over a fixed context, on the builtin model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, onnx_export, static_llm
from antinet_npu.build.onnx_models import cpu_session
from antinet_npu.runtime import generation
from antinet_npu.runtime.backends.base import GENERATION
from antinet_npu.signature import Signature
from conftest import error_line

AR, CL = 8, 64


def _stepper(model, folder, count: int) -> static_llm.StaticStepper:
    """Export `model` in `count` parts (AR-8 and AR-1 over 64 positions) to `folder`; the host loop over them."""
    graphs = {}
    for ar in (AR, 1):
        for part in static_llm.plan_parts(model.config.num_hidden_layers, count):
            path = folder / f"ar{ar}-part{part.index}.onnx"
            onnx_export.export_part(model, part, path, ar, CL, 17, -100.0).write(path)
            session = cpu_session(path)
            graphs.setdefault(ar, []).append((Signature.read(path), lambda f, s=session: s.run(None, f)))
    return static_llm.StaticStepper([s for s, _ in graphs[AR]], [g for _, g in graphs[AR]],
                                    [g for _, g in graphs[1]])


def _model(pipeline):
    model = checkpoint.load_snapshot(pipeline.path / "models/pytorch/tiny-qwen2")
    onnx_export.use_compact_attention(model)
    return model


@pytest.mark.slow
def test_stage_checks_the_parts_against_pytorch_greedy(pipeline):
    m = json.loads((pipeline.path / "metrics/export-npu-gen.json").read_text())
    assert m["greedy_prompts_equal"] == 3 and m["greedy_new_tokens"] == 32 and m["num_parts"] == 2
    assert m["max_rel_diff"] <= 1e-3 and m["parts"]["part0"]["embedding"] and m["parts"]["part1"]["lm_head"]
    folder = pipeline.path / artifacts.npu_gen_dir("tiny-qwen2")
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["ar1-part0.onnx", "ar1-part1.onnx", "ar32-part0.onnx",
                                                            "ar32-part1.onnx"]
    # one weights file per part, read by both of its graphs
    assert sorted(p.name for p in folder.glob("*.data")) == ["part0.onnx.data", "part1.onnx.data"]
    for graph in ("ar1-part1.onnx", "ar32-part1.onnx"):
        model = onnx.load(folder / graph, load_external_data=False)
        assert {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"} == {
            "part1.onnx.data"}
    assert m["parts"]["part1"]["weights_mb"] == round((folder / "part1.onnx.data").stat().st_size / 1e6, 3)
    signature = Signature.read(folder / "ar32-part1.onnx")
    assert signature.seq_len == 32 and signature.context_length == 256 and signature.part.head
    assert signature.inputs[:4] == ("hidden_states_2", "attention_mask", "position_ids_cos", "position_ids_sin")


@pytest.mark.slow
def test_split_gives_the_logits_of_the_whole_and_of_pytorch(pipeline, tmp_path):
    model = _model(pipeline)
    reference = checkpoint.load_snapshot(pipeline.path / "models/pytorch/tiny-qwen2")
    (tmp_path / "one").mkdir()
    (tmp_path / "four").mkdir()
    whole, split = _stepper(model, tmp_path / "one", 1), _stepper(model, tmp_path / "four", 4)
    prompt = np.random.default_rng(0).integers(0, 2000, 2 * AR + 5)  # three AR-8 chunks, the last padded on the right
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(prompt[None])).logits[0, -1].numpy()
    got_whole, got_split = whole.prefill(prompt), split.prefill(prompt)
    scale = np.abs(expected).max()
    assert np.abs(got_split - got_whole).max() <= 1e-5 * scale
    assert np.abs(got_whole - expected).max() <= 1e-4 * scale
    # decode through AR-1 equals PyTorch greedy generation
    reference.generation_config.eos_token_id = None
    with torch.no_grad():
        ids = torch.from_numpy(prompt[None])
        greedy = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                    pad_token_id=0)[0, prompt.size:].tolist()
    assert list(generation.generate(split, prompt, 12)) == greedy
    # a prompt that does not fit the context in AR-sized chunks
    with pytest.raises(AntinetError, match="the context holds 64"):
        split.prefill(np.ones(CL + 1, np.int64))


def test_parts_are_planned_evenly_and_bounded():
    parts = static_llm.plan_parts(28, 4)
    assert [(p.first_layer, p.num_layers) for p in parts] == [(0, 7), (7, 7), (14, 7), (21, 7)]
    assert parts[0].embeds and not parts[0].head and parts[-1].head
    assert [p.num_layers for p in static_llm.plan_parts(5, 2)] == [3, 2]
    with pytest.raises(AntinetError, match="parts must be 1..4, got 5"):
        static_llm.plan_parts(4, 5)


@pytest.mark.slow
@pytest.mark.parametrize("override,expected", [
    ("compile.generation.max_part_mb=1", "over compile.generation.max_part_mb 1: raise compile.generation.parts"),
    ("compile.generation.parts=9", "parts must be 1..4, got 9"),
    ("compile.generation.context_length=100000", "exceeds the model's 512 positions"),
    ("compile.generation.prefill_len=256", "context_length (256) must exceed prefill_len (256)"),
])
def test_bad_generation_graph_settings_are_one_line(pipeline, override, expected):
    folder = pipeline.path / artifacts.npu_gen_dir("tiny-qwen2")
    before = sorted(p.name for p in folder.iterdir())
    line = error_line(pipeline.cli("export-npu-gen", override), "export-npu-gen")
    assert expected in line, line
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written over the built parts


@pytest.mark.slow
def test_compile_gen_ships_one_shared_binary_per_part_and_verifies_unshared_ones(pipeline):
    from antinet_npu.build import qnn

    m = json.loads((pipeline.path / "metrics/compile-gen/w8a16.json").read_text())
    assert m["emulated"] is True and m["gate_passed"] is True and m["cpu_compute_nodes"] == 0
    assert m["samples"] >= 16 and 0 <= m["gen_agreement"] <= 1 and m["shared"] is True
    folder = pipeline.path / artifacts.qnn_gen_dir("tiny-qwen2", "w8a16")
    for i in range(m["num_parts"]):
        part = m["parts"][f"part{i}"]
        assert part["bins"] == 1 and part["bin_mb"] < part["unshared_bin_mb"]  # about one weight copy, not two
        shipped = [qnn.context_binaries(artifacts.qnn_gen_ctx(folder, ar, i)) for ar in (32, 1)]
        assert shipped[0] == shipped[1] and len(shipped[0]) == 1 and shipped[0][0].is_file()
        verified = [qnn.context_binaries(artifacts.qnn_gen_ctx(folder, ar, i, verify=True)) for ar in (32, 1)]
        assert verified[0] != verified[1] and all(b.is_file() for v in verified for b in v)


@pytest.mark.slow
def test_the_npu_parts_generate_on_the_emulator(pipeline, monkeypatch):
    from antinet_npu.config import load
    from antinet_npu.runtime.backends.qnn_ep import QnnHtpBackend

    m = json.loads((pipeline.path / "metrics/bench-gen/qnn-htp-w8a16.json").read_text())
    assert m["emulated"] is True and m["binaries"] == "unshared (verify/)" and m["p32"]["decode_tokens_per_s"] > 0
    monkeypatch.chdir(pipeline.path)
    backend = QnnHtpBackend(load(pipeline.path / "params.yaml"), "burst")
    backend.load(pipeline.path / artifacts.qnn_gen_dir("tiny-qwen2", "w8a16"), GENERATION)
    stepper = backend.stepper()
    tokens = list(generation.generate(stepper, np.arange(40, 80), 6))
    assert len(tokens) == 6 and stepper.length == 40 + 5
    with pytest.raises(AntinetError, match="the context holds 256"):
        stepper.prefill(np.ones(257, np.int64))
    backend.close()
    other = QnnHtpBackend(load(pipeline.path / "params.yaml", ["compile.generation.parts=4"]), "burst")
    with pytest.raises(AntinetError, match="was built for AR-1, context 256, 2 parts.*re-run `dvc repro compile-gen`"):
        other.load(pipeline.path / artifacts.qnn_gen_dir("tiny-qwen2", "w8a16"), GENERATION)


@pytest.mark.slow
def test_parts_built_for_another_context_are_refused(pipeline):
    line = error_line(pipeline.cli("compile-gen", "--precision", "w8a16", "compile.generation.context_length=128"),
                      "compile-gen")
    assert "was built for AR-32, context 256, 2 parts, not what compile.generation asks (AR-32, context 128" in line
    assert "dvc repro export-npu-gen" in line


@pytest.mark.slow
def test_appbuilder_generates_from_the_shared_binaries(pipeline, monkeypatch):
    """Against AppBuilder's documented API (no Snapdragon here): one QNNContext per part's shared .bin, the AR-N
    graph as graphIndex 0 and AR-1 as 1, float buffers in the wrappers' input order. The fake answers each call by
    running the FP32 part that the call names, so the loop must give the FP32 parts' greedy tokens."""
    import sys

    from test_bench import _FakeAppBuilder

    import antinet_npu.runtime.backends.appbuilder as ab
    from antinet_npu.config import load

    monkeypatch.chdir(pipeline.path)
    fp32 = {ar: [artifacts.npu_gen_part("tiny-qwen2", ar, i) for i in range(2)] for ar in (32, 1)}
    sessions = {(ar, i): cpu_session(p) for ar, paths in fp32.items() for i, p in enumerate(paths)}
    calls = []

    class QNNContext:
        def __init__(self, model_name, model_path, input_data_type="float", output_data_type="float", **kwargs):
            self.part = int(model_name.split("-part")[1].split("_")[0])  # the test's own map from .bin to part
            calls.append(("QNNContext", model_name))

        def Inference(self, input, perf_profile="default", graphIndex=0):
            ar = (32, 1)[graphIndex]
            calls.append(("Inference", self.part, graphIndex, input[0].dtype))
            signature = Signature.read(fp32[ar][self.part])
            feeds = {n: (x.astype(np.int32) if n == "input_ids" else x) for n, x in zip(signature.inputs, input)}
            return [y.reshape(-1) for y in sessions[ar, self.part].run(None, feeds)]

    fake = _FakeAppBuilder(None)
    fake.module.QNNContext = QNNContext
    monkeypatch.setitem(sys.modules, "qai_appbuilder", fake.module)
    monkeypatch.setattr(ab, "_configured", False)
    backend = ab.AppBuilderBackend(load(pipeline.path / "params.yaml"), "burst")
    backend.load(pipeline.path / artifacts.qnn_gen_dir("tiny-qwen2", "w8a16"), GENERATION)
    prompt = np.arange(100, 140)
    got = list(generation.generate(backend.stepper(), prompt, 8))
    backend.close()
    expected = list(generation.generate(static_llm.open_parts(fp32, cpu_session), prompt, 8))
    assert got == expected
    assert [c for c in calls if c[0] == "QNNContext"] == [("QNNContext", "ar32-part0_ctx_qnn"),
                                                          ("QNNContext", "ar32-part1_ctx_qnn")]
    inference = [c[1:] for c in calls if c[0] == "Inference"]
    assert inference[:4] == [(0, 0, np.float32), (1, 0, np.float32)] * 2  # two AR-32 chunks, then AR-1
    assert inference[4:6] == [(0, 1, np.float32), (1, 1, np.float32)] and len(inference) == 4 + 2 * 7


@pytest.mark.parametrize("filled", [0, 3, 10])
def test_calibration_traces_keep_only_the_filled_slots(filled):
    rng = np.random.default_rng(0)
    past_len, ar = 10, 2
    mask = np.full((1, 1, ar, past_len + ar), -100.0, np.float32)
    mask[:, :, :, :filled] = 0.0  # what StaticStepper._mask gives: the filled slots first (Genie's layout)
    mask[:, :, :, past_len:] = np.where(np.tril(np.ones((ar, ar), bool)), 0.0, -100.0)
    keys = np.zeros((2, 1, 4, past_len), np.float32)  # (kv_heads, 1, head_dim, past): keys transposed
    keys[..., :filled] = rng.standard_normal((2, 1, 4, filled))
    values = np.zeros((2, 1, past_len, 4), np.float32)
    values[:, :, :filled] = rng.standard_normal((2, 1, filled, 4))
    feeds = {"hidden_states_2": rng.standard_normal((1, ar, 8)).astype(np.float32), "attention_mask": mask,
             "past_key_0_in": keys, "past_value_0_in": values}
    trace = static_llm.Trace.of(feeds)
    assert trace.feeds["past_key_0_in"].shape == (2, 1, 4, filled)
    assert trace.feeds["past_value_0_in"].shape == (2, 1, filled, 4)
    full = trace.full()
    assert full.keys() == feeds.keys() and all(np.array_equal(full[k], v) for k, v in feeds.items())


@pytest.mark.slow
def test_one_ar_of_sessions_is_open_at_a_time_and_tracing_calls_what_generation_calls(pipeline, monkeypatch):
    """The memory bound at Qwen2-1.5B (a part's AR-N and AR-1 sessions never open together) on the builtin's parts;
    `trace_generation` (prefill all prompts, then decode) records the calls `generate` makes prompt by prompt."""
    monkeypatch.chdir(pipeline.path)
    fp32 = {ar: [artifacts.npu_gen_part("tiny-qwen2", ar, i) for i in range(2)] for ar in (32, 1)}
    ar_of = {p: ar for ar, paths in fp32.items() for p in paths}
    live, opened = [], []

    class Counted:
        def __init__(self, path):
            self.path, self.session = path, cpu_session(path)
            live.append(path)
            opened.append(path)
            assert len({ar_of[p] for p in live}) == 1, live

        def run(self, *args):
            return self.session.run(*args)

        def __del__(self):
            live.remove(self.path)

    prompts = [np.arange(100, 140), np.arange(300, 310)]
    by_prompt: dict = {}
    stepper = static_llm.open_parts(fp32, Counted, by_prompt)
    for prompt in prompts:
        list(generation.generate(stepper, prompt, 6))
    assert len(opened) == 2 * 2 * len(prompts)  # both ARs' parts, opened again for every prompt
    del stepper
    opened.clear()
    phased: dict = {}
    static_llm.trace_generation(static_llm.open_parts(fp32, Counted, phased), prompts, 6)
    assert len(opened) == 2 * 2  # each session opened once
    assert by_prompt.keys() == phased.keys()
    for key in by_prompt:
        assert len(by_prompt[key]) == len(phased[key])
        for a, b in zip(by_prompt[key], phased[key]):
            assert a.feeds.keys() == b.feeds.keys() and all(np.array_equal(a.feeds[k], b.feeds[k]) for k in a.feeds)


@pytest.mark.slow
def test_a_part_is_exported_from_its_own_weights_alone(pipeline, tmp_path):
    """What keeps export-npu-gen under 12 GB at Qwen2-1.5B, on the builtin: a model holding only the part's weights
    (the rest on the meta device) exports the same graph and weights as the whole model."""
    from antinet_npu.stages.export_npu_gen import part_params, weights_of

    snapshot = pipeline.path / "models/pytorch/tiny-qwen2"
    full = checkpoint.load_snapshot(snapshot)
    last = static_llm.plan_parts(full.config.num_hidden_layers, 2)[1]
    own = checkpoint.load_snapshot(snapshot, only=weights_of(last, full.config.tie_word_embeddings))
    loaded = {name for name, p in own.named_parameters() if not p.is_meta}
    assert loaded and all(name.startswith(("model.layers.2.", "model.layers.3.", "model.norm.", "model.embed_tokens"))
                          for name in loaded)  # the tied lm_head is the embedding
    assert part_params(own, last) == part_params(full, last)
    exported = []
    for name, model in (("full", full), ("own", own)):
        onnx_export.use_compact_attention(model)
        out = tmp_path / name / "part1.onnx"
        out.parent.mkdir()
        onnx_export.export_part(model, last, out, 8, 32, 17, -1e4)
        exported.append(((out.parent / "part1.onnx.data").read_bytes(), out.read_bytes()))
    assert exported[0] == exported[1]


def test_htp_graphs_keep_the_sessions_of_one_shape_open(tmp_path, monkeypatch):
    """The emulator (and a device process) has a few GB of NPU memory: AR-N and AR-1 contexts never open together."""
    from antinet_npu.build import qnn
    from antinet_npu.signature import ADDITIVE_MASK

    opened, closed = [], []

    class Fake:
        def __init__(self, model):
            self.name = model.name
            opened.append(self.name)

        def __del__(self):
            closed.append(self.name)

    monkeypatch.setattr(qnn, "session", lambda model, target, allow_cpu_fallback=False: Fake(model))
    paths = {}
    for name, tokens in (("a32", 32), ("b32", 32), ("a1", 1)):
        paths[name] = tmp_path / f"{name}.onnx"
        Signature(inputs=("x",), outputs=("y",), mask=ADDITIVE_MASK, context_length=64, seq_len=tokens).write(
            paths[name])
    graphs = qnn.HtpGraphs(target=None)
    for name in ("a32", "b32", "a32"):
        graphs.open(paths[name])
    assert opened == ["a32.onnx", "b32.onnx"] and closed == []
    graphs.open(paths["a1"])
    assert sorted(closed) == ["a32.onnx", "b32.onnx"] and opened[-1] == "a1.onnx"
