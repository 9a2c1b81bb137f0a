"""Turning a PyTorch causal LM into ONNX graphs: the dynamic export (CPU) and the static NPU-friendly export."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from antinet_npu.artifacts import MODELS, scratch_dir
from antinet_npu.build.onnx_models import consolidate
from antinet_npu.signature import ADDITIVE_MASK, PADDING_MASK, KvLayout, Part, Rope, Signature

log = logging.getLogger(__name__)


def kv_layout(config) -> KvLayout:
    """The KV cache of a transformers decoder config (Qwen2/Llama family)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KvLayout(num_layers=config.num_hidden_layers,
                    kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                    head_dim=head_dim)


class CausalLMWithCache(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, past keys/values...) -> (logits, present keys/values...).

    One graph for both uses: with an empty past (length 0) it is one forward pass over the whole input (the seed's
    single-pass benchmark, the fidelity windows); with a past it continues a generation.
    """

    def __init__(self, model: torch.nn.Module, layout: KvLayout):
        super().__init__()
        self.model, self.layout = model, layout  # attribute `model`: node names stay /model/model/layers.N/...

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layout.num_layers)],
                             config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


class _Reshape(torch.autograd.Function):
    """`x.reshape(shape)` exported as one Reshape with a constant shape, where 0 keeps the input's dimension
    (TorchScript's shape inference wants a -1 beside a 0).

    Traced, `x.view(batch, seq, heads, dim)` becomes a Shape -> Gather -> Unsqueeze -> Concat chain per call (about
    50 small nodes per decoder layer, each run at every decode step); ONNX's 0 needs none of them."""

    @staticmethod
    def forward(ctx, x, shape: tuple[int, ...]):
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape: tuple[int, ...]):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2  # static: the head dimension
    x1, x2 = torch.split(x, half, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Rotary(torch.autograd.Function):
    """Rotary embedding of (batch, heads, seq, dim) at `position_ids`, exported as onnxruntime's RotaryEmbedding
    (com.microsoft, CPU): one node where the decomposed form takes six per tensor, at every layer and step."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_cache, sin_cache):
        cos, sin = (torch.cat([c[position_ids]] * 2, dim=-1).unsqueeze(1) for c in (cos_cache, sin_cache))
        return _rotate(x, cos, sin)

    @staticmethod
    def symbolic(g, x, position_ids, cos_cache, sin_cache):
        y = g.op("com.microsoft::RotaryEmbedding", x, position_ids, cos_cache, sin_cache, interleaved_i=0)
        y.setType(x.type())
        return y


def compact_attention(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
    """The Qwen2/Llama attention forward, arithmetic unchanged, written for a small exported graph: reshapes with
    constant shapes (`_Reshape`), and grouped KV heads without `repeat_kv` (each KV head's query heads are stacked
    along the sequence axis, so K and V are read once instead of being copied to every query head: a copy of the
    whole past per layer and per step). Bound to each attention module by `use_compact_attention`."""
    heads, kv_heads, dim = self.config.num_attention_heads, self.config.num_key_value_heads, self.head_dim
    rep = heads // kv_heads
    q = _Reshape.apply(self.q_proj(hidden_states), (0, -1, heads, dim)).transpose(1, 2)
    k = _Reshape.apply(self.k_proj(hidden_states), (0, -1, kv_heads, dim)).transpose(1, 2)
    v = _Reshape.apply(self.v_proj(hidden_states), (0, -1, kv_heads, dim)).transpose(1, 2)
    tables = getattr(self, "rotary_tables", None)
    if tables is not None:  # onnxruntime's fused op, from position_ids (the CPU graph)
        q, k = (_Rotary.apply(t, kwargs["position_ids"], *tables) for t in (q, k))
    else:  # plain ops from the host's or the model's cos/sin (the NPU graphs)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if getattr(cache, "kv_major", False):
        # the NPU parts' cache (batch 1): kv heads lead, keys transposed, (kv, 1, dim, total) and (kv, 1, total,
        # dim), so the past graph inputs go straight into the Concat and never through a layout op
        keys_t, v = cache.update(k, v, self.layer_idx)
        grouped, merged = _Reshape.apply(q, (kv_heads, 1, -1, dim)), (1, heads, -1, dim)
    else:
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        keys_t = k.transpose(2, 3)
        grouped, merged = _Reshape.apply(q, (0, kv_heads, -1, dim)), (0, heads, -1, dim)
    # grouped: (batch or kv head, ..., rep x new, dim): query head i uses kv head i // rep
    weights = torch.matmul(grouped, keys_t) * self.scaling
    if attention_mask is not None:  # (batch, 1, new, total), the same for each of the rep query heads
        weights = weights + attention_mask.repeat(1, 1, rep, 1)
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
    out = _Reshape.apply(torch.matmul(weights, v), merged).transpose(1, 2)
    return self.o_proj(_Reshape.apply(out, (0, -1, heads * dim))), None


def use_compact_attention(model: torch.nn.Module, fused_rotary: bool = False, positions: int = 0) -> int:
    """Bind `compact_attention` to every Qwen2/Llama-style attention module (q/k/v/o projections, `head_dim`) and
    give the model the additive float mask eager attention takes. With `fused_rotary`, the rotary embedding becomes
    onnxruntime's RotaryEmbedding over cos/sin tables of `positions` rows. Returns the number of modules."""
    import types

    tables = None
    if fused_rotary:
        rope = Rope.of(model)
        angles = torch.arange(positions, dtype=torch.float64)[:, None] * torch.tensor(rope.inv_freq,
                                                                                      dtype=torch.float64)
        tables = ((torch.cos(angles) * rope.scaling).float(), (torch.sin(angles) * rope.scaling).float())

    model.set_attn_implementation("eager")
    found = [m for m in model.modules() if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "head_dim", "scaling", "layer_idx"))]
    for module in found:
        module.forward = types.MethodType(compact_attention, module)
        module.rotary_tables = tables
    return len(found)


def export_dynamic(model: torch.nn.Module, out: Path, opset: int, context_length: int) -> Signature:
    """Export the KV-cache graph (dynamic batch, sequence and past axes) to `out` (+ `out.data`).

    Attention is exported as `compact_attention` (changes `model` in place)."""
    log.info("compact attention: %d modules", use_compact_attention(model, fused_rotary=True,
                                                                    positions=context_length))
    layout = kv_layout(model.config)
    signature = Signature(inputs=("input_ids", "attention_mask", "position_ids", *layout.past_names()),
                          outputs=("logits", *layout.present_names()), mask=PADDING_MASK,
                          context_length=context_length, kv=layout)
    # Traced with a non-empty past and a new length different from it, so that no axis is mistaken for a constant
    batch, past_len, new = 2, 3, 5
    sample = (torch.ones((batch, new), dtype=torch.int64), torch.ones((batch, past_len + new), dtype=torch.int64),
              torch.arange(past_len, past_len + new).repeat(batch, 1),
              *(torch.zeros((batch, layout.kv_heads, past_len, layout.head_dim)) for _ in layout.past_names()))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
            **{n: {0: "batch", 2: "past_sequence"} for n in layout.past_names()},
            **{n: {0: "batch", 2: "total_sequence"} for n in layout.present_names()}}
    with scratch_dir(MODELS, "export") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow in transformers
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(CausalLMWithCache(model, layout), sample, str(raw), dynamo=False,
                              input_names=list(signature.inputs), output_names=list(signature.outputs),
                              dynamic_axes=axes, opset_version=opset, custom_opsets={"com.microsoft": 1})
        consolidate(raw, out)
    return signature


class _PartCache:
    """The cache protocol `compact_attention` calls, over the parts' KV layout (AI Hub's): past keys come in as
    (kv_heads, 1, head_dim, past) and values as (kv_heads, 1, past, head_dim); the layer's new entries are kept in the
    same layouts (the graph's outputs) and appended. Attention runs in that layout (`kv_major`): no op ever touches
    the past but the Concat, so a quantized past stays quantized from the graph input on."""

    kv_major = True

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]], layout: KvLayout):
        self.past, self.new, self.layout = past, {}, layout

    def update(self, key, value, layer_idx, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        kv_heads, dim = self.layout.kv_heads, self.layout.head_dim  # constants: the graph's shapes are static
        key_t = _Reshape.apply(key.transpose(2, 3), (kv_heads, 1, dim, -1))  # (1, kv, dim, new) -> (kv, 1, dim, new)
        value = _Reshape.apply(value, (kv_heads, 1, -1, dim))
        self.new[layer_idx] = (key_t, value)
        return torch.cat([past_key, key_t], dim=-1), torch.cat([past_value, value], dim=-2)


class DecoderPart(torch.nn.Module):
    """A `Part` of a Qwen2/Llama causal LM as a module with the static I/O of `static_llm` (attention:
    `compact_attention`): cos/sin come in with one value per rotated pair, (1, 1, AR, head_dim / 2)."""

    def __init__(self, model: torch.nn.Module, part: Part):
        super().__init__()
        self.model, self.part = model, part  # attribute `model`: node names stay /model/model/layers.N/...

    def forward(self, x, attention_mask, cos, sin, *past):
        inner, part = self.model.model, self.part
        hidden = inner.embed_tokens(x) if part.embeds else x
        cos, sin = (torch.cat([t, t], dim=-1)[:, 0] for t in (cos, sin))  # (1, AR, head_dim), halves repeated
        cache = _PartCache({layer: (past[2 * i], past[2 * i + 1]) for i, layer in enumerate(part.layers)},
                           kv_layout(self.model.config))
        for layer in part.layers:
            hidden = inner.layers[layer](hidden, attention_mask=attention_mask, position_embeddings=(cos, sin),
                                         cache=cache)
        out = self.model.lm_head(inner.norm(hidden)) if part.head else hidden
        return (out, *(t for layer in part.layers for t in cache.new[layer]))


class StaticCausalLM(torch.nn.Module):
    """(input_ids, additive float mask (1, 1, S, S), position_ids) -> logits: the NPU-friendly form.

    The HTP backend needs static shapes and rejects the Where-based mask transformers builds from an int64
    attention_mask, so the mask is an input, computed once on the host (`signature.causal_mask`).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits

_PRIVATE_DOMAIN = "antinet_npu"
QDQ_OPSET = 21  # 16-bit Q/DQ needs opset 21; onnxruntime's QDQ quantizer would convert to it anyway


class _RMSNormOp(torch.autograd.Function):
    """RMSNorm as one node: SimplifiedLayerNormalization, which the QNN EP maps to HTP's RmsNorm.

    Exported op by op (Pow, ReduceMean, Sqrt, Div), RMSNorm quantizes x^2 of a real LLM's outlier activations
    into one 16-bit range and loses the small ones; the fused op keeps that arithmetic inside the NPU kernel.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    @staticmethod
    def symbolic(g, x, weight, eps: float):
        # Exported in a private domain so that the opset conversion leaves it alone (`_to_qdq_opset`)
        y = g.op(f"{_PRIVATE_DOMAIN}::SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps,
                 stash_type_i=1)
        y.setType(x.type())
        return y


class _FusedRMSNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, float(norm.variance_epsilon)

    def forward(self, x):
        return _RMSNormOp.apply(x, self.weight, self.eps)


def fuse_rmsnorm(model: torch.nn.Module) -> int:
    """Swap every RMSNorm module (Llama/Qwen2 style: `weight`, `variance_epsilon`) for the one-node form."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon")]
    for parent, name, child in swaps:
        setattr(parent, name, _FusedRMSNorm(child))
    return len(swaps)


def export_static(model: torch.nn.Module, out: Path, seq_len: int, opset: int, mask_value: float,
                  rmsnorm: str = "decomposed") -> Signature:
    """Static-shape export for the NPU: batch 1, `seq_len` tokens, eager attention, TorchScript exporter.

    rmsnorm="fused" exports each RMSNorm as one SimplifiedLayerNormalization node (see `_RMSNormOp`); this changes
    `model` in place.
    """
    if rmsnorm == "fused":
        log.info("RMSNorm as SimplifiedLayerNormalization: %d modules", fuse_rmsnorm(model))
    signature = Signature(inputs=("input_ids", "attention_mask", "position_ids"), outputs=("logits",),
                          mask=ADDITIVE_MASK, context_length=seq_len, seq_len=seq_len, mask_value=mask_value)
    feeds = {k: torch.from_numpy(v) for k, v in signature.static_feeds(np.zeros((1, seq_len), np.int64)).items()}
    with scratch_dir(MODELS, "export") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(StaticCausalLM(model), tuple(feeds.values()), str(raw), dynamo=False,
                              input_names=list(signature.inputs), output_names=list(signature.outputs),
                              opset_version=opset,
                              custom_opsets={_PRIVATE_DOMAIN: 1})
        _to_qdq_opset(raw, Path(tmp) / "converted.onnx")
        consolidate(Path(tmp) / "converted.onnx", out)
    return signature


def _to_qdq_opset(src: Path, dst: Path) -> None:
    """Convert to opset 21 (weights stay where they are), then move the fused RMSNorm into the default domain,
    where onnxruntime (CPU and QNN EP) registers SimplifiedLayerNormalization; the converter knows no schema for it."""
    model = onnx.load(str(src), load_external_data=False)
    if any(t.HasField("raw_data") and t.ByteSize() > 1024 for t in model.graph.initializer):
        # Under 2 GB the exporter keeps the weights inline, and the converter copies the whole model (several GB
        # for a 1.3 GB part of Qwen2-1.5B): move them to an external file first, so it converts the graph only.
        onnx.save_model(model, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=src.name + ".data", size_threshold=1024)
        model = onnx.load(str(src), load_external_data=False)
    model = onnx.version_converter.convert_version(model, QDQ_OPSET)
    for node in model.graph.node:
        if node.domain == _PRIVATE_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != _PRIVATE_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save_model(model, str(dst))


def export_part(model: torch.nn.Module, part: Part, out: Path, prefill_len: int, context_length: int, opset: int,
                mask_value: float) -> Signature:
    """One static generation graph (see `static_llm`): `part` of `model` taking `prefill_len` tokens per call over
    a context of `context_length`. Call `use_compact_attention` (and `fuse_rmsnorm` if wanted) on `model` first."""
    layout = kv_layout(model.config)
    ar, past_len, half = prefill_len, context_length - prefill_len, layout.head_dim // 2
    first = (torch.zeros((1, ar), dtype=torch.int32) if part.embeds
             else torch.zeros((1, ar, model.config.hidden_size)))
    past = [torch.zeros(layout.part_shape(kind, past_len)) for _ in part.layers for kind in ("key", "value")]
    sample = (first, torch.zeros((1, 1, ar, context_length)), torch.ones((1, 1, ar, half)),
              torch.zeros((1, 1, ar, half)), *past)
    signature = Signature(inputs=tuple(part.input_names()), outputs=tuple(part.output_names()), mask=ADDITIVE_MASK,
                          context_length=context_length, seq_len=ar, mask_value=mask_value, kv=layout, part=part,
                          rope=Rope.of(model))
    with scratch_dir(MODELS, "export") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            torch.onnx.export(DecoderPart(model, part), sample, str(raw), dynamo=False,
                              input_names=list(signature.inputs), output_names=list(signature.outputs),
                              opset_version=opset, custom_opsets={_PRIVATE_DOMAIN: 1})
        _to_qdq_opset(raw, Path(tmp) / "converted.onnx")
        consolidate(Path(tmp) / "converted.onnx", out)
    return signature
