"""Per-layer-group quantization sensitivity, measured on the PyTorch model with fake quantization.

A *group* is a set of weight matrices quantized together: per decoder layer the attention projections (q/k/v/o),
the MLP's input projections (gate/up) and its output projection (down), plus the lm_head and the embedding. A
*probe* is the numeric damage a recipe family does (weight bits and granularity, activation bits and granularity).
For each group alone the probe fake-quantizes that group, runs calibration windows, and records the damage against
the float model (KL, top-1 agreement); everything else stays float. Weight-only fake quantization on the CPU was a
trustworthy proxy of the NPU's weight error on SmolLM2 (see NOTES), unlike running QDQ models on the CPU EP.

Mixed recipes read the ranking (`kept_groups`) and keep the top groups at a higher precision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.config import MixedConfig, ProbeConfig
from antinet_npu.metrics import SENSITIVITY

_LAYER = re.compile(r"layers[./](\d+)[./](self_attn|mlp)[./](\w+?)_proj\b")
_KIND = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp_in", "up": "mlp_in", "down": "mlp_out"}


def group_of(name: str) -> str | None:
    """The group of a weight's module or ONNX node name (`model.layers.3.mlp.up_proj`,
    `/model/model/layers.3/mlp/up_proj/MatMul`, `/model/lm_head/MatMul`), or None."""
    m = _LAYER.search(name)
    if m:
        kind = _KIND.get(m.group(3))
        return f"layer{int(m.group(1)):02d}.{kind}" if kind else None
    if re.search(r"(^|[./])lm_head([./]|$)", name):
        return "lm_head"
    if re.search(r"(^|[./])embed_tokens([./]|$)", name):
        return "embedding"
    return None


@dataclass(frozen=True)
class GroupDamage:
    group: str
    kl: float
    top1_agreement: float
    params: int


@dataclass(frozen=True)
class Sensitivity:
    """What the sensitivity stage measured for one probe: each group's damage, most damaging first."""

    model: str
    probe: str
    groups: tuple[GroupDamage, ...]

    def ranked(self) -> list[GroupDamage]:
        return sorted(self.groups, key=lambda g: (-g.kl, g.group))

    @classmethod
    def read(cls, path: Path, model: str) -> Sensitivity:
        """The ranking written by `sensitivity@<probe>` for `model`; a missing, damaged or other model's file is
        an error naming the stage to run."""
        stage = f"`dvc repro sensitivity@{path.stem}`"
        if not path.is_file():
            raise AntinetError(f"{path} not found: run {stage} first")
        try:
            data = json.loads(path.read_text())
            groups = tuple(GroupDamage(name, float(g["kl"]), float(g["top1_agreement"]), int(g["params"]))
                           for name, g in data["groups"].items())
            found = cls(str(data["model"]), str(data["probe"]), groups)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AntinetError(f"{path} is damaged ({type(exc).__name__}: {exc}): re-run {stage}") from None
        if found.model != model:
            raise AntinetError(f"{path} was measured on {found.model}, not {model}: re-run {stage}")
        return found


def fake_quant(x, bits: int, granularity: str, block_size: int = 32, symmetric: bool = True,
               float_zero: bool = False):
    """Quantize-dequantize `x` (torch). Scales are shared by `block_size` consecutive values of the last axis
    (`block`: K of a (out, in) weight or of an activation row), by a row (`channel`: an output channel of a weight),
    or by the whole tensor (`tensor`). Asymmetric: an integer zero point, or with `float_zero` the minimum itself
    as a float offset (llama.cpp's Q4_1)."""
    import torch

    shape = x.shape
    if granularity == "tensor":
        flat = x.reshape(1, -1)
    elif granularity == "channel":
        flat = x.reshape(-1, shape[-1])
    else:
        pad = (-shape[-1]) % block_size
        flat = torch.nn.functional.pad(x, (0, pad)).reshape(-1, block_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = flat.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
        out = (flat / scale).round().clamp(-qmax - 1, qmax) * scale
    elif float_zero:
        lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
        out = ((flat - lo) / scale).round().clamp(0, 2 ** bits - 1) * scale + lo
    else:
        lo, hi = flat.amin(-1, keepdim=True).clamp_max(0), flat.amax(-1, keepdim=True).clamp_min(0)
        scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
        zero = (-lo / scale).round()
        out = ((flat / scale).round() + zero).clamp(0, 2 ** bits - 1).sub(zero) * scale
    if granularity == "block":
        out = out.reshape(*shape[:-1], -1)[..., : shape[-1]]
    return out.reshape(shape)


def modules_by_group(model) -> dict[str, list[tuple[str, object]]]:
    """Weight-bearing modules (Linear, Embedding) by group, in model order."""
    import torch

    out: dict[str, list[tuple[str, object]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            group = group_of(name)
            if group:
                out.setdefault(group, []).append((name, module))
    return out


@contextmanager
def quantized(modules: list[tuple[str, object]], probe: ProbeConfig) -> Iterator[None]:
    """Within the block, `modules` run with the probe's fake-quantized weights (and inputs, for Linear layers).

    New Parameters are assigned rather than written in place, so tied weights (lm_head = embedding) stay float in
    the module that is not being probed.
    """
    import torch

    saved, hooks = [], []
    p = probe
    for _, module in modules:
        saved.append((module, module.weight))
        module.weight = torch.nn.Parameter(fake_quant(module.weight.data, p.weight_bits, p.weight_granularity,
                                                      p.block_size, p.weight_symmetric, p.weight_zero == "float"),
                                           requires_grad=False)
        if p.activation_bits and isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(lambda _m, args: (fake_quant(
                args[0], p.activation_bits, p.activation_granularity, p.block_size, p.activation_symmetric),
                *args[1:])))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, weight in saved:
            module.weight = weight


def measure(model, model_name: str, windows: np.ndarray, probe_name: str, probe: ProbeConfig, batch: int = 4,
            progress=None, replay_prefix: bool = True) -> Sensitivity:
    """Each group's damage under `probe`, alone, on `windows` (N, S) of token ids.

    A group in decoder layer L leaves layers 0..L-1 as they were: with `replay_prefix` their outputs come from the
    float run instead of being computed again (about 40% of the work at Qwen2-1.5B; the same numbers)."""
    layers = _decoder_layers(model)
    replay = _LayerReplay(layers) if replay_prefix and layers is not None else None
    with replay.recording() if replay else nullcontext():
        reference = _Reference(_logprobs(model, windows, batch, replay))
    groups = modules_by_group(model)
    results = []
    for k, (group, modules) in enumerate(groups.items()):
        with quantized(modules, probe), replay.replaying(_first_layer(group, len(layers))) if replay else nullcontext():
            variant = _logprobs(model, windows, batch, replay)
        kl, top1 = _damage(reference, variant)
        params = sum(m.weight.numel() for _, m in modules)
        results.append(GroupDamage(group, kl, top1, params))
        del variant
        if progress:
            progress(k + 1, len(groups), group, kl)
    return Sensitivity(model_name, probe_name, tuple(results))


def _decoder_layers(model):
    """The decoder layers of a Qwen2/Llama-family model (`model.model.layers`), or None."""
    import torch

    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def _first_layer(group: str, num_layers: int) -> int:
    """The first decoder layer a group's quantization changes: its own, none for the lm_head, all for the embedding."""
    m = re.match(r"layer(\d+)\.", group)
    return int(m.group(1)) if m else num_layers if group == "lm_head" else 0


class _LayerReplay:
    """The float model's decoder layer outputs, recorded per batch; replayed, the layers before a given one return
    them instead of computing them. `batch` is set by the caller before each forward pass."""

    def __init__(self, layers):
        self.layers = layers
        self.outputs: list[list] = [[] for _ in layers]
        self.batch = 0

    @contextmanager
    def recording(self) -> Iterator[None]:
        hooks = [layer.register_forward_hook(lambda _m, _args, out, i=i: self.outputs[i].append(out))
                 for i, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @contextmanager
    def replaying(self, first: int) -> Iterator[None]:
        for i in range(first):
            self.layers[i].forward = lambda *_args, i=i, **_kwargs: self.outputs[i][self.batch]
        try:
            yield
        finally:
            for i in range(first):
                del self.layers[i].forward


def _logprobs(model, windows: np.ndarray, batch: int, replay: _LayerReplay | None = None):
    """float64 log-probabilities of the model on `windows` (N, S), `batch` windows per forward pass."""
    import torch

    ids = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    out = []
    with torch.inference_mode():
        for b, i in enumerate(range(0, len(ids), batch)):
            if replay:
                replay.batch = b
            out.append(torch.log_softmax(model(input_ids=ids[i:i + batch], use_cache=False).logits.double(), -1))
    return torch.cat(out)


class _Reference:
    """The float model's log-probabilities (float64, (N, S, V)) and what every group's comparison needs of them,
    computed once: its probabilities, their negative entropy per position, its top-1 tokens."""

    def __init__(self, logprobs):
        self.probs = logprobs.exp()
        self.neg_entropy = _dot(self.probs, logprobs)
        self.top1 = logprobs.argmax(-1)


def _dot(a, b):
    """sum(a * b, -1) of two (..., V) tensors as one batched matrix product (no (..., V) temporary)."""
    v = a.shape[-1]
    return (a.reshape(-1, 1, v) @ b.reshape(-1, v, 1)).reshape(a.shape[:-1])


def _damage(reference: _Reference, variant) -> tuple[float, float]:
    """(mean KL(reference || variant), top-1 agreement) of the reference and a variant's log-probabilities.
    KL = sum p (log p - log q), as negative entropy minus cross-entropy: one product per variant; float64 keeps
    the difference of the two exact to ~1e-12 of KLs around 1e-4."""
    kl = max(0.0, float((reference.neg_entropy - _dot(reference.probs, variant)).mean()))  # >= 0 but for rounding
    return kl, float((variant.argmax(-1) == reference.top1).float().mean())


ACTIVATION_SITES = ("residual", "norm_out", "linear_in", "linear_out")


def _sites(model) -> dict[str, tuple[str, list]]:
    """Activation tensors by site: (hook on module 'in'put or 'out'put, modules)."""
    import torch

    linears = [m for _, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {"residual": ("out", list(model.model.layers)),  # the stream between decoder layers
            "norm_out": ("out", [m for n, m in model.named_modules() if n.endswith("norm")]),
            "linear_in": ("in", linears), "linear_out": ("out", linears)}


def measure_activations(model, calibration: np.ndarray, windows: np.ndarray, bits: int, batch: int = 4
                        ) -> dict[str, dict]:
    """Damage of static per-tensor activation quantization at `bits`, one site at a time (all its tensors):
    ranges calibrated (MinMax) on `calibration`, damage measured on `windows`. This is what a QDQ recipe does to
    activations; a site whose range is huge (massive activations in the residual stream) is where it hurts."""
    import torch

    def first(x):
        return x[0] if isinstance(x, tuple) else x

    def fq(x, lo: float, hi: float):
        scale = max((hi - lo) / (2 ** bits - 1), 1e-12)
        zero = round(-lo / scale)
        return (torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1) - zero) * scale

    reference = _Reference(_logprobs(model, windows, batch))
    out = {}
    for site, (where, modules) in _sites(model).items():
        ranges: dict[int, tuple[float, float]] = {}

        def observe(k, t):
            lo, hi = ranges.get(k, (0.0, 0.0))
            ranges[k] = (min(lo, float(t.min())), max(hi, float(t.max())))

        hooks = [m.register_forward_pre_hook(lambda _m, a, k=k: observe(k, a[0])) if where == "in" else
                 m.register_forward_hook(lambda _m, _a, o, k=k: observe(k, first(o))) for k, m in enumerate(modules)]
        _logprobs(model, calibration, batch)
        for h in hooks:
            h.remove()

        def quant_out(o, lo, hi):
            return (fq(o[0], lo, hi), *o[1:]) if isinstance(o, tuple) else fq(o, lo, hi)

        hooks = [m.register_forward_pre_hook(lambda _m, a, r=ranges[k]: (fq(a[0], *r), *a[1:])) if where == "in"
                 else m.register_forward_hook(lambda _m, _a, o, r=ranges[k]: quant_out(o, *r))
                 for k, m in enumerate(modules)]
        variant = _logprobs(model, windows, batch)
        for h in hooks:
            h.remove()
        kl, top1 = _damage(reference, variant)
        widest = max(hi - lo for lo, hi in ranges.values())
        out[site] = {"kl": kl, "top1_agreement": top1, "widest_range": widest,
                     "step_at_widest": widest / (2 ** bits - 1)}
    return out


def to_metrics(sensitivity: Sensitivity) -> dict:
    ranked = sensitivity.ranked()
    return {"model": sensitivity.model, "probe": sensitivity.probe, "num_groups": len(ranked),
            "max_kl": ranked[0].kl if ranked else None, "most_sensitive": ranked[0].group if ranked else None,
            "groups": {g.group: {"kl": g.kl, "top1_agreement": g.top1_agreement, "params": g.params,
                                 "rank": ranked.index(g) + 1} for g in sensitivity.groups}}


def kept_groups(mixed: MixedConfig | None, model: str, available: Iterable[str]) -> list[str]:
    """The layer groups a mixed recipe keeps at higher precision: the `keep` most damaging under its probe among
    those the recipe quantizes (`available`: e.g. no embedding for MatMul-only recipes)."""
    if mixed is None or mixed.keep == 0:
        return []
    ranked = Sensitivity.read(SENSITIVITY.path(mixed.probe), model).ranked()
    available = set(available)
    return [g.group for g in ranked if g.group in available][:mixed.keep]


def mixed_metrics(mixed: MixedConfig | None, groups: list[str], nodes: list[str]) -> dict:
    """What a mixed recipe kept, as metric scalars (nothing for a uniform recipe)."""
    if mixed is None:
        return {}
    return {"mixed_probe": mixed.probe, "mixed_keep_as": mixed.keep_as, "kept_groups": ",".join(groups),
            "kept_nodes": len(nodes)}
