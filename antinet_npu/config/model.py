"""The model, the text it is judged on, and its FP32 ONNX export: `model`, `text`, `export`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from antinet_npu.config.schema import SLUG, doc, require

BUILTIN_PREFIX = "builtin:"
MAIN_DOMAIN = "main"  # text.source among the text domains


@dataclass
class BuiltinModelConfig:
    """A small Qwen2 the pipeline builds itself: fixed seed, offline tokenizer, optionally trained briefly."""

    vocab_size: int = field(default=4096, metadata=doc("model vocabulary (embedding rows)"))
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    tokenizer_vocab_size: int = field(default=4096, metadata=doc("BPE vocabulary trained on the text source"))
    seed: int = 0
    train_steps: int = field(default=300, metadata=doc("0 keeps the random weights"))
    train_batch_size: int = 8
    train_seq_len: int = 128
    learning_rate: float = 3e-3

    def check(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "tokenizer_vocab_size", "train_batch_size",
                  "train_seq_len"):
            require(getattr(self, f) > 0, f"model.builtin.{f} must be positive, got {getattr(self, f)}")
        require(self.hidden_size % self.num_attention_heads == 0,
                 f"model.builtin.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                 f"({self.num_attention_heads})")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                 "model.builtin.num_attention_heads must be a multiple of num_key_value_heads")
        require(self.tokenizer_vocab_size <= self.vocab_size,
                 "model.builtin.tokenizer_vocab_size must not exceed model.builtin.vocab_size")
        require(self.train_steps >= 0, f"model.builtin.train_steps must be >= 0, got {self.train_steps}")
        require(self.train_seq_len <= self.max_position_embeddings,
                 "model.builtin.train_seq_len must not exceed max_position_embeddings")


@dataclass
class ModelConfig:
    name: str = field(default=MISSING, metadata=doc("short name used in artifact paths, e.g. tiny-qwen2"))
    source: str = field(default=MISSING, metadata=doc("'builtin:<label>', a local directory, or a hub id"))
    revision: Optional[str] = field(default=None, metadata=doc("hub revision (branch, tag or commit)"))
    trust_remote_code: bool = False
    builtin: Optional[BuiltinModelConfig] = field(default=None, metadata=doc("spec of a builtin model"))
    fetch_hint: Optional[str] = field(default=None,
                                      metadata=doc("how to obtain a local source that is missing (error text)"))

    def check(self) -> None:
        require(bool(SLUG.match(self.name)),
                 f"model.name {self.name!r} must be a plain file name (letters, digits, '.', '_', '-')")
        require(bool(self.source.strip()), "model.source is empty: set a builtin:, a local directory or a hub id")
        if self.is_builtin:
            require(self.builtin is not None,
                     f"model.source is {self.source!r} but model.builtin is not set: add a model.builtin section")

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith(BUILTIN_PREFIX)


@dataclass
class TextConfig:
    """Where calibration and evaluation text comes from, and how documents are split between uses."""

    source: str = field(default="builtin:stdlib-docstrings", metadata=doc(
        "the main text (it also trains the builtin model): builtin:stdlib-docstrings, builtin:lee-news, or a local "
        ".txt/.md file or folder of them"))
    domains: dict[str, str] = field(default_factory=dict, metadata=doc(
        "more text by name (same kinds of source), for calibration and evaluation only: calibration draws from "
        "every domain, fidelity is reported and gated on each one's held-out documents"))
    eval_fraction: float = field(default=0.15, metadata=doc("share of documents held out for evaluation"))
    calib_fraction: float = field(default=0.15, metadata=doc("share of documents used for calibration"))

    def check(self) -> None:
        require(0 < self.eval_fraction < 1 and 0 < self.calib_fraction < 1
                 and self.eval_fraction + self.calib_fraction < 1,
                 "text.eval_fraction and text.calib_fraction must be in (0, 1) and sum to less than 1")
        for name in self.domains:
            require(name != MAIN_DOMAIN and bool(SLUG.match(name)),
                    f"text.domains: {name!r} is not a usable domain name (letters, digits, '.', '-', '_'; not "
                    f"{MAIN_DOMAIN!r}, which names text.source)")

    def named(self) -> dict[str, str]:
        """Every domain's source by name, the main text first."""
        return {MAIN_DOMAIN: self.source, **self.domains}


@dataclass
class ExportConfig:
    opset: int = field(default=17, metadata=doc("ONNX opset (14-21)"))
    validate_batches: int = field(default=3, metadata=doc("sample batches compared with PyTorch"))
    validate_seq_len: int = 64
    validate_prompts: int = field(default=3, metadata=doc("held-out prompts whose greedy generation must equal "
                                                            "PyTorch generate() token for token"))
    validate_prompt_len: int = 16
    validate_new_tokens: int = 32
    max_rel_diff: float = field(default=1e-3, metadata=doc("fail the export when max |logits - PyTorch| exceeds "
                                                             "this fraction of max |PyTorch logits|"))
    min_top1: float = field(default=0.99, metadata=doc("fail the export when fewer positions have PyTorch's "
                                                         "argmax"))

    def check(self) -> None:
        require(14 <= self.opset <= 21, f"export.opset must be between 14 and 21, got {self.opset}")
        require(self.validate_batches > 0 and self.validate_seq_len > 1,
                 f"export.validate_batches must be > 0 and export.validate_seq_len > 1, got "
                 f"{self.validate_batches} and {self.validate_seq_len}")
        require(self.validate_prompts >= 0 and self.validate_prompt_len > 0 and self.validate_new_tokens > 0,
                 "export.validate_prompts must be >= 0, validate_prompt_len and validate_new_tokens > 0")
        require(self.max_rel_diff > 0 and 0 < self.min_top1 <= 1,
                 f"export.max_rel_diff must be > 0 and export.min_top1 in (0, 1], got {self.max_rel_diff} and "
                 f"{self.min_top1}")
