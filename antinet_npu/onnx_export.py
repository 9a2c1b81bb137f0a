"""Turning a PyTorch causal LM into ONNX graphs: the dynamic export (CPU) and the static NPU-friendly export."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from antinet_npu.artifacts import MODELS, scratch_dir
from antinet_npu.onnx_models import consolidate
from antinet_npu.signature import ADDITIVE_MASK, PADDING_MASK, KvLayout, Signature

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


GROUPED_ATTENTION = "antinet_grouped"


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention for grouped KV heads without `repeat_kv`: each KV head's query heads are stacked along the
    sequence axis, so K and V are read once instead of being copied to every query head (a copy of the whole
    past per layer and per decode step in the exported graph). Same arithmetic as transformers' eager attention."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = query.reshape(batch, kv_heads, heads // kv_heads * q_len, head_dim)  # head i uses KV head i // rep
    weights = torch.matmul(groups, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        shape = weights.shape
        weights = (weights.reshape(batch, kv_heads, heads // kv_heads, q_len, -1)
                   + attention_mask[:, :, None]).reshape(shape)
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).reshape(batch, heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_attention(model: torch.nn.Module) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)  # the additive float mask eager attention takes
    model.set_attn_implementation(GROUPED_ATTENTION)


def export_dynamic(model: torch.nn.Module, out: Path, opset: int, context_length: int) -> Signature:
    """Export the KV-cache graph (dynamic batch, sequence and past axes) to `out` (+ `out.data`).

    Attention is exported as `grouped_attention` (changes `model` in place)."""
    use_grouped_attention(model)
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
                              dynamic_axes=axes, opset_version=opset)
        consolidate(raw, out)
    return signature


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
    model = onnx.version_converter.convert_version(onnx.load(str(src), load_external_data=False), QDQ_OPSET)
    for node in model.graph.node:
        if node.domain == _PRIVATE_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != _PRIVATE_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    onnx.save_model(model, str(dst))
