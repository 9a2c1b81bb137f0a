"""The GGUF writer behind export-gguf (llama.cpp, the second CPU peer): names, shapes, types and values of what it
writes for both families; with llama-cpp-python installed (the llamacpp extra), llama.cpp's greedy tokens against
PyTorch's."""

from __future__ import annotations

import numpy as np
import pytest

from antinet_npu import AntinetError
from antinet_npu.build import gguf_export
from antinet_npu.build.checkpoint import train_tokenizer
from antinet_npu.build.corpus import Document

gguf = pytest.importorskip("gguf")

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat " * 20


def tiny_snapshot(tmp_path, family: str):
    """A random model of `family` with a trained byte-level BPE tokenizer, saved as `prepare` saves it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer([Document("d", TEXT)], 300)
    shape = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    config, cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    model = cls(config(**shape)).eval()
    with torch.no_grad():  # larger than the init's 0.02 so that greedy tokens differ from step to step
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    path = tmp_path / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_gguf_holds_every_weight_under_llama_cpp_names(tmp_path, family):
    snapshot, model, tokenizer = tiny_snapshot(tmp_path, family)
    out = tmp_path / "f16.gguf"
    count = gguf_export.write_float(snapshot, out)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    state = model.state_dict()
    assert count == len(tensors) == len([k for k in state if k != "lm_head.weight"])  # tied: token_embd serves
    assert ("blk.0.attn_q.bias" in tensors) == (family == "qwen2")
    for name, hf in (("token_embd.weight", "model.embed_tokens.weight"), ("blk.1.ffn_down.weight",
                                                                          "model.layers.1.mlp.down_proj.weight")):
        assert tensors[name].tensor_type.name == "F16"
        np.testing.assert_array_equal(np.asarray(tensors[name].data), state[hf].numpy().astype(np.float16))
    assert tensors["output_norm.weight"].tensor_type.name == "F32"
    q = np.asarray(tensors["blk.0.attn_q.weight"].data).astype(np.float32)
    hf_q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    if family == "qwen2":  # NeoX rotation in both: rows as they are
        np.testing.assert_allclose(q, hf_q, rtol=1e-3, atol=1e-3)
    else:  # Llama: llama.cpp rotates interleaved pairs, so each head's rows come in (0, d/2, 1, d/2 + 1, ...) order
        head_dim = 64 // 4
        order = np.arange(head_dim).reshape(2, -1).T.reshape(-1)
        np.testing.assert_allclose(q[:head_dim], hf_q[:head_dim][order], rtol=1e-3, atol=1e-3)
    fields = reader.fields
    arch = fields["general.architecture"].contents()
    assert arch == family and fields[f"{arch}.block_count"].contents() == 2
    assert fields[f"{arch}.attention.head_count_kv"].contents() == 2
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[tokenizer.eos_token_id] == tokenizer.eos_token
    assert tokens[-1] == "[PAD319]"  # the model's vocabulary is larger than the tokenizer's


def test_gguf_export_refuses_another_family(tmp_path):
    snapshot, _, _ = tiny_snapshot(tmp_path, "qwen2")
    config = (snapshot / "config.json").read_text().replace('"model_type": "qwen2"', '"model_type": "gpt2"')
    (snapshot / "config.json").write_text(config)
    with pytest.raises(AntinetError, match="Qwen2 and Llama families, not model_type 'gpt2'"):
        gguf_export.write_float(snapshot, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_llama_cpp_generates_what_pytorch_generates(tmp_path, family):
    pytest.importorskip("llama_cpp", reason="the llamacpp extra (built from source) is not installed")
    import torch

    from antinet_npu.runtime import generation
    from antinet_npu.runtime.backends.llama_cpp import LlamaCppStepper, load

    snapshot, model, _ = tiny_snapshot(tmp_path, family)
    gguf_export.write_float(snapshot, tmp_path / "f16.gguf")
    gguf_export.quantize(tmp_path / "f16.gguf", tmp_path / "q8_0.gguf", "q8_0", 2)
    assert gguf_export.tensor_types(tmp_path / "q8_0.gguf")["Q8_0"] >= 7 * 2  # every layer matrix at 8 bits
    prompt = np.arange(3, 19)
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt[None]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None)[0, len(prompt):].tolist()
    stepper = LlamaCppStepper(load(tmp_path / "f16.gguf", 2))
    assert list(generation.generate(stepper, prompt, 8)) == expected  # float16 weights: PyTorch's tokens
    mark = stepper.snapshot()
    logits = stepper.decode(7)
    stepper.restore(mark)  # rewinding and stepping again gives the same logits
    np.testing.assert_array_equal(stepper.decode(7), logits)
    first = stepper.prefill(prompt)
    quantized = LlamaCppStepper(load(tmp_path / "q8_0.gguf", 2)).prefill(prompt)
    cosine = float(first @ quantized / np.linalg.norm(first) / np.linalg.norm(quantized))
    assert cosine > 0.99  # 8-bit weights and activations: close, not equal (0.9997 here on random weights)
