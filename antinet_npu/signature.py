"""What a graph takes and gives, written next to it by the stage that builds it and read by whoever runs it.

Feed builders and backends read the signature instead of guessing from module constants, configs or file names:
input and output names, whether the sequence axis is fixed, how the attention mask is encoded, the KV-cache layout,
and the longest context the model supports. `<artifact>.json` sits beside `<artifact>` (as `<artifact>.data` does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError

PADDING_MASK = "padding"    # int64 (batch, past + new): 1 for a real token, 0 for padding; the graph builds causality
ADDITIVE_MASK = "additive"  # float (1, 1, S, S) added to the attention scores: 0 where visible, mask_value elsewhere


@dataclass(frozen=True)
class KvLayout:
    """A KV cache as optimum names it: `past_key_values.{i}.key` in, `present.{i}.key` out, each
    (batch, kv_heads, length, head_dim) float32; `present` holds past + new entries."""

    num_layers: int
    kv_heads: int
    head_dim: int

    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def part_shape(self, kind: str, length: int) -> tuple[int, ...]:
        """A generation part's cache tensor (`static_llm`) of `length` positions: keys (kv_heads, 1, head_dim,
        length), values (kv_heads, 1, length, head_dim), as AI Hub lays them out and Genie reads them (it takes the
        cache length from the keys' last dimension)."""
        if kind == "key":
            return (self.kv_heads, 1, self.head_dim, length)
        return (self.kv_heads, 1, length, self.head_dim)

    def empty(self, batch: int = 1) -> dict[str, np.ndarray]:
        """An empty past (length 0): the graph then runs one plain forward pass."""
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names()}


@dataclass(frozen=True)
class Part:
    """One graph's share of the model: decoder layers [first_layer, first_layer + num_layers), plus the embedding
    (first part) and the final norm + lm_head (last part).

    Its I/O is Qualcomm AI Hub's and Genie's contract (see `static_llm`): the tensor between two parts carries one
    name on both sides (`hidden_name`), as Genie connects parts by name, and each graph is named
    `<prompt|token>_ar<AR>_cl<CL>_<i>_of_<n>` inside its context binary, as Genie orders parts by that name."""

    index: int
    count: int
    first_layer: int
    num_layers: int

    @property
    def embeds(self) -> bool:
        return self.index == 0

    @property
    def head(self) -> bool:
        return self.index == self.count - 1

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)

    @staticmethod
    def hidden_name(layer: int) -> str:
        """The residual stream entering decoder layer `layer`: one part's output, the next part's input."""
        return f"hidden_states_{layer}"

    def input_names(self) -> list[str]:
        first = "input_ids" if self.embeds else self.hidden_name(self.first_layer)
        return [first, "attention_mask", "position_ids_cos", "position_ids_sin",
                *(f"past_{kind}_{layer}_in" for layer in self.layers for kind in ("key", "value"))]

    def output_names(self) -> list[str]:
        first = "logits" if self.head else self.hidden_name(self.first_layer + self.num_layers)
        return [first, *(f"past_{kind}_{layer}_out" for layer in self.layers for kind in ("key", "value"))]

    def graph_name(self, tokens: int, context_length: int) -> str:
        """The name of this part's AR-`tokens` graph inside a context binary (AI Hub's, which Genie parses)."""
        kind = "token" if tokens == 1 else "prompt"
        return f"{kind}_ar{tokens}_cl{context_length}_{self.index + 1}_of_{self.count}"


@dataclass(frozen=True)
class Rope:
    """Rotary tables on the host: cos/sin of position x inv_freq (one value per rotated pair), scaled.

    `theta`: the base b when the rotary is plain RoPE (inv_freq_i = b^(-2i/d), no scaling), the only kind Genie's
    `rope-theta` describes; None for scaled kinds (linear, NTK, llama3)."""

    inv_freq: tuple[float, ...]
    scaling: float = 1.0
    theta: float | None = None

    @classmethod
    def of(cls, model) -> Rope:
        """The tables of a transformers Qwen2/Llama model (its rotary module's inv_freq, with any scaling in it)."""
        rotary, config = model.model.rotary_emb, model.config
        params = getattr(config, "rope_parameters", None) or {}
        base = params.get("rope_theta", getattr(config, "rope_theta", None))
        freqs = np.asarray(rotary.inv_freq, np.float64)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        plain = params.get("rope_type", "default") == "default" and scaling == 1.0 and base is not None and \
            np.allclose(freqs, float(base) ** (-np.arange(freqs.size) / freqs.size), rtol=1e-4)
        return cls(tuple(float(f) for f in freqs), scaling, float(base) if plain else None)

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(AR,) positions -> cos, sin of shape (1, 1, AR, head_dim / 2), float32, as the graphs take them
        (`position_ids_cos` / `_sin`) and as Genie computes them from `rope-theta`."""
        angles = np.asarray(positions, np.float64)[:, None] * np.asarray(self.inv_freq, np.float64)[None]
        cos, sin = np.cos(angles) * self.scaling, np.sin(angles) * self.scaling
        return cos[None, None].astype(np.float32), sin[None, None].astype(np.float32)


@dataclass(frozen=True)
class Signature:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    mask: str                        # PADDING_MASK | ADDITIVE_MASK
    context_length: int              # most positions the model takes (prompt + generated)
    seq_len: int | None = None       # fixed tokens per call (static graphs), None when dynamic
    mask_value: float | None = None  # ADDITIVE_MASK: what hides a position
    kv: KvLayout | None = None       # None: no cache (one pass over the whole sequence)
    part: Part | None = None         # static generation graphs: which share of the model (static_llm)
    rope: Rope | None = None         # static generation graphs: the rotary tables the host computes
    context_graph: int | None = None  # a shared context binary's graph index (AppBuilder's graphIndex)
    # integer inputs/outputs of a compiled graph: name -> {scale, zero_point, dtype} (real = (q - zero_point) * scale)
    quantized_io: dict | None = None

    @property
    def can_generate(self) -> bool:
        """One graph that generates on its own (a part needs the others and the host loop of static_llm)."""
        return self.kv is not None and self.part is None

    def write(self, artifact: Path) -> None:
        from antinet_npu.artifacts import write_json

        write_json(path_of(artifact), asdict(self))

    @classmethod
    def read(cls, artifact: Path) -> Signature:
        path = path_of(artifact)
        if not path.is_file():
            raise AntinetError(f"{path} not found (the signature of {artifact.name}): re-run the stage that built "
                               f"{artifact.name} (`dvc repro`)")
        try:
            data = json.loads(path.read_text())
            nested = {"kv": KvLayout, "part": Part, "rope": Rope}
            for key, kind in nested.items():
                value = data.pop(key, None)
                data[key] = kind(**value) if value else None
            if data["rope"] is not None:
                data["rope"] = replace(data["rope"], inv_freq=tuple(data["rope"].inv_freq))
            return cls(**{**data, "inputs": tuple(data["inputs"]), "outputs": tuple(data["outputs"])})
        except (ValueError, TypeError, KeyError) as exc:
            raise AntinetError(f"{path} is damaged ({exc}): delete it and re-run `dvc repro`") from None

    def static_feeds(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs of a static graph for one (1, S) window: the additive causal mask and positions 0..S-1."""
        seq = input_ids.shape[-1]
        if self.seq_len is not None and seq != self.seq_len:
            raise AntinetError(f"this graph runs exactly {self.seq_len} tokens, got {seq}: pad or cut the input, or "
                               "compile that length")
        feeds = {"input_ids": input_ids.reshape(1, seq).astype(np.int64),
                 "attention_mask": causal_mask(seq, self.mask_value),
                 "position_ids": np.arange(seq, dtype=np.int64)[None]}
        return {name: feeds[name] for name in self.inputs}


def path_of(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def causal_mask(seq_len: int, mask_value: float) -> np.ndarray:
    """Additive causal mask (1, 1, S, S): 0 on and below the diagonal, `mask_value` above."""
    return np.triu(np.full((seq_len, seq_len), mask_value, dtype=np.float32), 1)[None, None]
