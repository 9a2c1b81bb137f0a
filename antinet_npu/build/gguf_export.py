"""A prepared snapshot (Qwen2 or Llama family) -> GGUF for llama.cpp, the CPU peer measured beside us.

Written here, not with llama.cpp's converter script: that script is not in llama-cpp-python's wheel, and it refuses a
tokenizer it holds no hash for (the builtin models train their own). The float file is streamed from the
safetensors one tensor at a time (matrices float16, norms and biases float32, as the converter writes them); the
requested type is then made by llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs), so the
peer is measured as its users build it, mixed types included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError

# What `llama-quantize` is asked for (llama.h's llama_ftype values)
FILE_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 7}
_PRE_TOKENIZERS = {"qwen2": "qwen2", "llama": "default"}  # llama.cpp's pre-tokenizer regex per family


def write_float(snapshot: Path, out: Path) -> int:
    """Writes `snapshot` as a float16 GGUF at `out`; returns the number of tensors."""
    import gguf
    from safetensors import safe_open

    config = json.loads((snapshot / "config.json").read_text())
    family = config.get("model_type")
    if family not in _PRE_TOKENIZERS:
        raise AntinetError(f"GGUF export knows the Qwen2 and Llama families, not model_type {family!r}")
    arch = gguf.MODEL_ARCH.QWEN2 if family == "qwen2" else gguf.MODEL_ARCH.LLAMA
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    names = gguf.get_tensor_name_map(arch, n_layers)

    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(snapshot.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(FILE_TYPES["f16"])
    _add_tokenizer(writer, snapshot, config, _PRE_TOKENIZERS[family])

    plan = []  # (file, Hugging Face name, dtype) in the order of the tensor infos
    for file in sorted(snapshot.glob("*.safetensors")):
        with safe_open(file, "np") as weights:
            for hf_name in weights.keys():
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp reads the tied output from token_embd
                name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise AntinetError(f"{file.name}: no GGUF name for {hf_name!r} ({family})")
                shape = weights.get_slice(hf_name).get_shape()
                dtype = np.dtype(np.float16 if len(shape) == 2 else np.float32)
                writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
                plan.append((file, hf_name, dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for file, hf_name, dtype in plan:
        with safe_open(file, "np") as weights:
            tensor = weights.get_tensor(hf_name)
        if family == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp's Llama rotates interleaved pairs; Hugging Face's halves: reorder the rows per head
            heads = n_head if "q_proj" in hf_name else n_kv
            tensor = tensor.reshape(heads, 2, -1, tensor.shape[-1]).swapaxes(1, 2).reshape(tensor.shape)
        writer.write_tensor_data(np.ascontiguousarray(tensor, dtype=dtype))
    writer.close()
    return len(plan)


def quantize(src: Path, dest: Path, file_type: str, threads: int) -> None:
    """llama.cpp's quantizer: `src` (float GGUF) -> `dest` at `file_type`."""
    from antinet_npu.runtime.backends.llama_cpp import require

    llama_cpp = require()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[file_type]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), params) != 0:
        raise AntinetError(f"llama.cpp could not quantize {src} to {file_type}")


def _add_tokenizer(writer, snapshot: Path, config: dict, pre: str) -> None:
    """The snapshot's byte-level BPE as llama.cpp's `gpt2` tokenizer, padded to the model's vocabulary (the pipeline
    feeds token ids; this keeps llama.cpp's own tokenizer usable on the file)."""
    import gguf

    spec = json.loads((snapshot / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise AntinetError(f"GGUF export needs a byte-level BPE tokenizer.json, {snapshot} has {model.get('type')}")
    vocab_size = config["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in model["vocab"].items():
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if isinstance(config.get(key), int):
            add(config[key])
    writer.add_add_bos_token(False)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF holds (llama.cpp's quantizer keeps some at other types)."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))
