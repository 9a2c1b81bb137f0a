"""What a graph takes and gives, written next to it by the stage that builds it and read by whoever runs it.

Feed builders and backends read the signature instead of guessing from module constants, configs or file names:
input and output names, whether the sequence axis is fixed, how the attention mask is encoded, the KV-cache layout,
and the longest context the model supports. `<artifact>.json` sits beside `<artifact>` (as `<artifact>.data` does).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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

    def empty(self, batch: int = 1) -> dict[str, np.ndarray]:
        """An empty past (length 0): the graph then runs one plain forward pass."""
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names()}


@dataclass(frozen=True)
class Part:
    """One graph's share of the model: decoder layers [first_layer, first_layer + num_layers), plus the embedding
    (first part) and the final norm + lm_head (last part)."""

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

    def input_names(self) -> list[str]:
        first = "input_ids" if self.embeds else "hidden_states"
        return [first, "attention_mask", "position_cos", "position_sin",
                *(f"past_{kind}_{layer}_in" for layer in self.layers for kind in ("key", "value"))]

    def output_names(self) -> list[str]:
        first = "logits" if self.head else "hidden_states_out"
        return [first, *(f"past_{kind}_{layer}_out" for layer in self.layers for kind in ("key", "value"))]


@dataclass(frozen=True)
class Rope:
    """Rotary tables on the host: cos/sin of position x inv_freq, halves repeated (Qwen2/Llama layout), scaled."""

    inv_freq: tuple[float, ...]
    scaling: float = 1.0

    @classmethod
    def of(cls, model) -> Rope:
        """The tables of a transformers Qwen2/Llama model (its rotary module's inv_freq, with any scaling in it)."""
        rotary = model.model.rotary_emb
        return cls(tuple(float(f) for f in rotary.inv_freq), float(getattr(rotary, "attention_scaling", 1.0)))

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(AR,) positions -> cos, sin of shape (1, AR, head_dim), float32."""
        angles = np.asarray(positions, np.float64)[:, None] * np.asarray(self.inv_freq, np.float64)[None]
        angles = np.concatenate([angles, angles], axis=-1)
        cos, sin = np.cos(angles) * self.scaling, np.sin(angles) * self.scaling
        return cos[None].astype(np.float32), sin[None].astype(np.float32)


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
                data["rope"] = Rope(tuple(data["rope"].inv_freq), data["rope"].scaling)
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
