"""The one typed config tree, loaded from `params.yaml` (or composed from `conf/`) and validated once.

`conf/` holds the Hydra config groups; `dvc exp run` composes them into `params.yaml`, which is what every stage
reads. Stages receive a `Config`, never raw dicts. Unknown keys, wrong types and bad values become an
`AntinetError` with a one-line message that names the key and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_args, get_type_hints

from omegaconf import MISSING, OmegaConf
from omegaconf import errors as oc_errors

from antinet_npu import AntinetError

CONF_DIR = "conf"
PARAMS_FILE = "params.yaml"
BUILTIN_PREFIX = "builtin:"
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _help(text: str) -> Any:
    return {"help": text}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AntinetError(message)


@dataclass
class BuiltinModelConfig:
    """A small Qwen2 the pipeline builds itself: fixed seed, offline tokenizer, optionally trained briefly."""

    vocab_size: int = field(default=4096, metadata=_help("model vocabulary (embedding rows)"))
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    tokenizer_vocab_size: int = field(default=4096, metadata=_help("BPE vocabulary trained on the text source"))
    seed: int = 0
    train_steps: int = field(default=300, metadata=_help("0 keeps the random weights"))
    train_batch_size: int = 8
    train_seq_len: int = 128
    learning_rate: float = 3e-3

    def check(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "tokenizer_vocab_size", "train_batch_size",
                  "train_seq_len"):
            _require(getattr(self, f) > 0, f"model.builtin.{f} must be positive, got {getattr(self, f)}")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"model.builtin.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                 f"({self.num_attention_heads})")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 "model.builtin.num_attention_heads must be a multiple of num_key_value_heads")
        _require(self.tokenizer_vocab_size <= self.vocab_size,
                 "model.builtin.tokenizer_vocab_size must not exceed model.builtin.vocab_size")
        _require(self.train_steps >= 0, f"model.builtin.train_steps must be >= 0, got {self.train_steps}")
        _require(self.train_seq_len <= self.max_position_embeddings,
                 "model.builtin.train_seq_len must not exceed max_position_embeddings")


@dataclass
class ModelConfig:
    name: str = field(default=MISSING, metadata=_help("short name used in artifact paths, e.g. tiny-qwen2"))
    source: str = field(default=MISSING, metadata=_help("'builtin:<label>', a local directory, or a hub id"))
    revision: Optional[str] = field(default=None, metadata=_help("hub revision (branch, tag or commit)"))
    trust_remote_code: bool = False
    builtin: Optional[BuiltinModelConfig] = field(default=None, metadata=_help("spec of a builtin model"))
    fetch_hint: Optional[str] = field(default=None,
                                      metadata=_help("how to obtain a local source that is missing (error text)"))

    def check(self) -> None:
        _require(bool(_SLUG.match(self.name)),
                 f"model.name {self.name!r} must be a plain file name (letters, digits, '.', '_', '-')")
        _require(bool(self.source.strip()), "model.source is empty: set a builtin:, a local directory or a hub id")
        if self.is_builtin:
            _require(self.builtin is not None,
                     f"model.source is {self.source!r} but model.builtin is not set: add a model.builtin section")

    @property
    def is_builtin(self) -> bool:
        return self.source.startswith(BUILTIN_PREFIX)


@dataclass
class TextConfig:
    """Where calibration and evaluation text comes from, and how documents are split between uses."""

    source: str = field(default="builtin:stdlib-docstrings",
                        metadata=_help("builtin:stdlib-docstrings, or a local .txt/.md file or folder of them"))
    eval_fraction: float = field(default=0.15, metadata=_help("share of documents held out for evaluation"))
    calib_fraction: float = field(default=0.15, metadata=_help("share of documents used for calibration"))

    def check(self) -> None:
        _require(0 < self.eval_fraction < 1 and 0 < self.calib_fraction < 1
                 and self.eval_fraction + self.calib_fraction < 1,
                 "text.eval_fraction and text.calib_fraction must be in (0, 1) and sum to less than 1")


@dataclass
class ExportConfig:
    opset: int = field(default=17, metadata=_help("ONNX opset (14-21)"))
    validate_batches: int = field(default=3, metadata=_help("sample batches compared with PyTorch"))
    validate_seq_len: int = 64
    validate_prompts: int = field(default=3, metadata=_help("held-out prompts whose greedy generation must equal "
                                                            "PyTorch generate() token for token"))
    validate_prompt_len: int = 16
    validate_new_tokens: int = 32
    max_rel_diff: float = field(default=1e-3, metadata=_help("fail the export when max |logits - PyTorch| exceeds "
                                                             "this fraction of max |PyTorch logits|"))
    min_top1: float = field(default=0.99, metadata=_help("fail the export when fewer positions have PyTorch's "
                                                         "argmax"))

    def check(self) -> None:
        _require(14 <= self.opset <= 21, f"export.opset must be between 14 and 21, got {self.opset}")
        _require(self.validate_batches > 0 and self.validate_seq_len > 1,
                 f"export.validate_batches must be > 0 and export.validate_seq_len > 1, got "
                 f"{self.validate_batches} and {self.validate_seq_len}")
        _require(self.validate_prompts >= 0 and self.validate_prompt_len > 0 and self.validate_new_tokens > 0,
                 "export.validate_prompts must be >= 0, validate_prompt_len and validate_new_tokens > 0")
        _require(self.max_rel_diff > 0 and 0 < self.min_top1 <= 1,
                 f"export.max_rel_diff must be > 0 and export.min_top1 in (0, 1], got {self.max_rel_diff} and "
                 f"{self.min_top1}")


GRANULARITIES = ("block", "channel", "tensor")


@dataclass
class ProbeConfig:
    """The numeric damage of a recipe family, simulated on the PyTorch model (fake quantization) by `sensitivity`."""

    weight_bits: int = field(default=8, metadata=_help("bits per weight"))
    weight_granularity: str = field(default="block", metadata=_help("block | channel | tensor: what shares a scale"))
    block_size: int = field(default=32, metadata=_help("values per scale along K, for block granularity"))
    weight_symmetric: bool = True
    activation_bits: Optional[int] = field(default=None, metadata=_help("inputs of the quantized MatMuls "
                                                                        "fake-quantized too (null: weights only)"))
    activation_granularity: str = field(default="block", metadata=_help("block (per row, as MatMulNBits "
                                                                         "accuracy_level 4 does) | tensor"))
    activation_symmetric: bool = True

    def check(self) -> None:
        _require(2 <= self.weight_bits <= 16, f"weight_bits must be 2..16, got {self.weight_bits}")
        _require(self.activation_bits is None or 2 <= self.activation_bits <= 16,
                 f"activation_bits must be 2..16 or null, got {self.activation_bits}")
        _require(self.weight_granularity in GRANULARITIES and self.activation_granularity in GRANULARITIES,
                 f"weight_granularity and activation_granularity must be one of {', '.join(GRANULARITIES)}")
        _require(self.block_size > 0, f"block_size must be positive, got {self.block_size}")


@dataclass
class SensitivityConfig:
    """Per-layer-group damage of each probe (the `sensitivity` matrix), measured on calibration text."""

    probes: dict[str, ProbeConfig] = field(default_factory=dict, metadata=_help("probe name -> damage model"))
    num_samples: int = field(default=8, metadata=_help("calibration windows of seq_len tokens"))
    seq_len: int = 128
    threads: int = field(default=0, metadata=_help("torch threads (0: all cores)"))

    def check(self) -> None:
        _require(self.num_samples > 0 and self.seq_len > 1, f"sensitivity.num_samples must be > 0 and seq_len > 1, "
                 f"got {self.num_samples} and {self.seq_len}")
        for name, probe in self.probes.items():
            _require(bool(_SLUG.match(name)), f"sensitivity.probes: bad probe name {name!r}")
            try:
                probe.check()
            except AntinetError as exc:
                raise AntinetError(f"sensitivity.probes.{name}: {exc}") from None


@dataclass
class MixedConfig:
    """Keep a recipe's most sensitive layer groups (ranked by a sensitivity probe) at a higher precision."""

    probe: str = field(default=MISSING, metadata=_help("a key of sensitivity.probes whose ranking is used"))
    keep: int = field(default=0, metadata=_help("how many of the most sensitive groups to keep"))
    keep_as: str = field(default="float", metadata=_help("CPU: float | 8bit (8-bit blocks of block_size) | "
                                                         "fp32-compute (same bits, float activations: slow on CPU); "
                                                         "NPU: w16 (16-bit weights) | float (fp16 on HTP)"))
    block_size: Optional[int] = field(default=None, metadata=_help("keep_as 8bit: block size of the kept groups "
                                                                   "(null: the recipe's); smaller blocks also "
                                                                   "quantize their activations in smaller blocks"))

    def check(self, allowed: tuple[str, ...]) -> None:
        _require(self.keep >= 0, f"mixed.keep must be >= 0, got {self.keep}")
        _require(self.keep_as in allowed, f"mixed.keep_as must be one of {', '.join(allowed)}, got {self.keep_as!r}")
        _require(self.block_size is None or (self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0),
                 f"mixed.block_size must be a power of 2 >= 16, got {self.block_size}")


CPU_KEEP_AS = ("float", "8bit", "fp32-compute")
NPU_KEEP_AS = ("w16", "float")


QUANT_METHODS = ("fp16", "dynamic-int8", "matmul-nbits")
WEIGHT_TYPES = ("QUInt8", "QInt8")
NBITS_ALGORITHMS = ("rtn", "hqq")


@dataclass
class RecipeConfig:
    """How one CPU precision variant is made from the FP32 ONNX model. Fields apply to the methods noted."""

    method: str = field(default=MISSING, metadata=_help("fp16 | dynamic-int8 | matmul-nbits"))
    nodes_to_exclude: list[str] = field(default_factory=list, metadata=_help("node names left in float32"))
    keep_io_types: bool = field(default=True, metadata=_help("fp16: keep float32 graph inputs and outputs"))
    op_block_list: list[str] = field(default_factory=list,
                                     metadata=_help("fp16: op types left in float32 (empty: onnxruntime default)"))
    weight_type: str = field(default="QUInt8", metadata=_help("dynamic-int8: QUInt8 (the seed's recipe) or QInt8"))
    per_channel: bool = field(default=False, metadata=_help("dynamic-int8: per-channel weight scales"))
    reduce_range: bool = field(default=False, metadata=_help("dynamic-int8: 7-bit weights"))
    op_types: list[str] = field(default_factory=list,
                                metadata=_help("dynamic-int8: op types to quantize (empty: all supported)"))
    bits: int = field(default=8, metadata=_help("matmul-nbits: 8 or 4 bits per weight"))
    block_size: int = field(default=32, metadata=_help("matmul-nbits: weights per scale (power of 2, >= 16)"))
    symmetric: bool = field(default=True, metadata=_help("matmul-nbits: no zero points"))
    accuracy_level: int = field(default=4, metadata=_help("matmul-nbits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"))
    algorithm: str = field(default="rtn", metadata=_help("matmul-nbits: rtn (round to nearest) | hqq (half-quadratic "
                                                         "optimisation of scales and zero points; 4 bits only)"))
    eight_bit_nodes: list[str] = field(default_factory=list,
                                       metadata=_help("matmul-nbits 4-bit: MatMul nodes kept at 8 bits (e.g. lm_head)"))
    fuse_siblings: bool = field(default=True, metadata=_help("matmul-nbits: one MatMulNBits for the MatMuls that read "
                                                             "the same input (q/k/v, gate/up): same weights, fewer "
                                                             "kernel calls"))
    mixed: Optional[MixedConfig] = field(default=None, metadata=_help("matmul-nbits / dynamic-int8: keep the most "
                                                                      "sensitive layer groups at higher precision"))

    def check(self) -> None:
        _require(self.method in QUANT_METHODS,
                 f"unknown quantization method {self.method!r}: choose one of {', '.join(QUANT_METHODS)}")
        _require(self.weight_type in WEIGHT_TYPES, f"weight_type must be one of {', '.join(WEIGHT_TYPES)}")
        _require(self.bits in (4, 8), f"bits must be 4 or 8, got {self.bits}")
        _require(self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0,
                 f"block_size must be a power of 2 >= 16, got {self.block_size}")
        _require(0 <= self.accuracy_level <= 4, f"accuracy_level must be 0..4, got {self.accuracy_level}")
        _require(self.algorithm in NBITS_ALGORITHMS,
                 f"algorithm must be one of {', '.join(NBITS_ALGORITHMS)}, got {self.algorithm!r}")
        _require(self.algorithm != "hqq" or self.bits == 4, "algorithm hqq needs bits: 4")
        _require(not self.eight_bit_nodes or self.bits == 4, "eight_bit_nodes applies to bits: 4 only")
        if self.mixed is not None:
            _require(self.method != "fp16", "mixed applies to matmul-nbits and dynamic-int8 recipes")
            self.mixed.check(CPU_KEEP_AS)
            _require(self.mixed.keep_as != "8bit" or self.method == "matmul-nbits",
                     "mixed.keep_as 8bit needs a matmul-nbits recipe")
            _require(self.mixed.keep_as != "fp32-compute" or self.method == "matmul-nbits",
                     "mixed.keep_as fp32-compute needs a matmul-nbits recipe")


@dataclass
class QuantizeConfig:
    precisions: list[str] = field(default_factory=list, metadata=_help("recipes to build (the quantize matrix)"))
    recipes: dict[str, RecipeConfig] = field(default_factory=dict, metadata=_help("precision name -> recipe"))

    def check(self) -> None:
        for name in self.precisions:
            _require(name in self.recipes, f"quantize.precisions lists unknown precision {name!r}: valid ones are "
                     f"{', '.join(self.recipes)} (add a recipe under quantize.recipes)")
        _require(len(set(self.precisions)) == len(self.precisions), "quantize.precisions has duplicates")
        for name, recipe in self.recipes.items():
            _require(bool(_SLUG.match(name)) and name != REFERENCE, f"quantize.recipes: bad precision name {name!r}")
            try:
                recipe.check()
            except AntinetError as exc:
                raise AntinetError(f"quantize.recipes.{name}: {exc}") from None


REFERENCE = "fp32"
GATE_MODES = ("fail", "warn")


@dataclass
class GateConfig:
    """Lowest fidelity a variant may have against FP32 (null: not checked)."""

    min_top1: Optional[float] = None
    min_cosine: Optional[float] = None
    max_kl: Optional[float] = None
    max_ppl_increase: Optional[float] = field(default=None, metadata=_help("relative, 0.01 = +1 % perplexity"))
    mode: Optional[str] = field(default=None, metadata=_help("fail | warn for this variant; null: the section's mode"))

    def check(self) -> None:
        _require(self.mode is None or self.mode in GATE_MODES,
                 f"gate mode must be one of {', '.join(GATE_MODES)} or null, got {self.mode!r}")


def _check_gates(gates: dict[str, GateConfig], section: str) -> None:
    for name, gate in gates.items():
        try:
            gate.check()
        except AntinetError as exc:
            raise AntinetError(f"{section}.gates.{name}: {exc}") from None


def gate_for(gates: dict[str, GateConfig], precision: str) -> GateConfig:
    """The precision's own gate, else the `default` one, else no bounds."""
    return gates.get(precision) or gates.get("default") or GateConfig()


@dataclass
class EvaluateConfig:
    variants: dict[str, str] = field(default_factory=dict,
                                     metadata=_help("precision -> ONNX file under models/onnx/ (the matrix)"))
    num_samples: int = field(default=16, metadata=_help("held-out windows of seq_len tokens"))
    seq_len: int = 128
    threads: int = field(default=0, metadata=_help("onnxruntime intra-op threads (0: all cores)"))
    gen_prompts: int = field(default=4, metadata=_help("held-out prompts continued greedily by FP32 and the "
                                                       "variant (generation agreement; 0: skip)"))
    prompt_len: int = 32
    gen_tokens: int = field(default=32, metadata=_help("new tokens per prompt"))
    mode: str = field(default="fail", metadata=_help("fail: a variant under its gate fails the stage; warn: logs"))
    gates: dict[str, GateConfig] = field(default_factory=dict,
                                         metadata=_help("precision -> gate; 'default' for the others"))

    def check(self) -> None:
        _require(self.num_samples > 0 and self.seq_len > 1,
                 f"evaluate.num_samples must be > 0 and seq_len > 1, got {self.num_samples} and {self.seq_len}")
        _require(self.gen_prompts >= 0 and self.prompt_len > 0 and self.gen_tokens > 0,
                 f"evaluate.gen_prompts must be >= 0, prompt_len and gen_tokens > 0, got {self.gen_prompts}, "
                 f"{self.prompt_len}, {self.gen_tokens}")
        _require(self.mode in GATE_MODES, f"evaluate.mode must be one of {', '.join(GATE_MODES)}")
        _require(REFERENCE in self.variants, "evaluate.variants must include fp32 (the reference)")
        _check_gates(self.gates, "evaluate")

    def gate(self, precision: str) -> GateConfig:
        return gate_for(self.gates, precision)

    def gate_mode(self, precision: str) -> str:
        return self.gate(precision).mode or self.mode


HTP_PERF_MODES = ("burst", "balanced", "default", "high_performance", "power_saver", "low_power_saver",
                  "high_power_saver", "extreme_power_saver", "sustained_high_performance")


@dataclass
class TargetConfig:
    """The NPU the context binaries are compiled for (QNN EP provider options)."""

    name: str = field(default="snapdragon-x-elite", metadata=_help("label recorded in metrics"))
    soc_model: int = field(default=60, metadata=_help("QNN SoC id: 60 = Snapdragon X Elite"))
    htp_arch: int = field(default=73, metadata=_help("Hexagon architecture version (v73)"))
    htp_performance_mode: str = field(default="burst", metadata=_help(", ".join(HTP_PERF_MODES)))
    htp_graph_finalization_optimization_mode: int = field(default=3, metadata=_help("0 (fast) .. 3 (best)"))

    def check(self) -> None:
        _require(self.htp_performance_mode in HTP_PERF_MODES,
                 f"target.htp_performance_mode must be one of {', '.join(HTP_PERF_MODES)}")
        _require(0 <= self.htp_graph_finalization_optimization_mode <= 3,
                 "target.htp_graph_finalization_optimization_mode must be 0..3")


RMSNORM_FORMS = ("fused", "decomposed")
QDQ_TYPES = ("QUInt8", "QInt8", "QUInt16", "QInt16")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")


@dataclass
class QdqRecipeConfig:
    """Static QDQ quantization for the HTP backend (onnxruntime's get_qnn_qdq_config)."""

    activation_type: str = field(default="QUInt16", metadata=_help(", ".join(QDQ_TYPES)))
    weight_type: str = field(default="QUInt8", metadata=_help(", ".join(QDQ_TYPES)))
    per_channel: bool = field(default=False, metadata=_help("per-output-channel symmetric weights (MatMul, Conv); "
                                                             "needs a signed weight_type"))
    calibrate_method: str = field(default="MinMax", metadata=_help(", ".join(CALIBRATION_METHODS)))
    activation_symmetric: bool = False
    nodes_to_exclude: list[str] = field(default_factory=list)
    float_residual: bool = field(default=False, metadata=_help("the residual stream (its Adds and the nodes "
                                                                "reading it: RMSNorms) stays float, fp16 on HTP: "
                                                                "massive activations span ~26000 in SmolLM2"))
    mixed: Optional[MixedConfig] = field(default=None, metadata=_help("keep the most sensitive layer groups at 16-bit "
                                                                      "weights (keep_as: w16) or float"))
    kv_type: Optional[str] = field(default=None, metadata=_help("generation graphs: the KV cache's inputs and outputs "
                                                                "(past_*), e.g. QUInt8 to halve its traffic; null: "
                                                                "activation_type"))

    def check(self) -> None:
        _require(self.kv_type is None or self.kv_type in QDQ_TYPES, f"kv_type must be null or one of "
                 f"{', '.join(QDQ_TYPES)}, got {self.kv_type!r}")
        _require(self.activation_type in QDQ_TYPES and self.weight_type in QDQ_TYPES,
                 f"activation_type and weight_type must be one of {', '.join(QDQ_TYPES)}")
        _require(not self.per_channel or self.weight_type.startswith("QInt"),
                 f"per_channel weights are symmetric: use weight_type QInt8 or QInt16, not {self.weight_type}")
        _require(self.calibrate_method in CALIBRATION_METHODS,
                 f"calibrate_method must be one of {', '.join(CALIBRATION_METHODS)}")
        if self.mixed is not None:
            self.mixed.check(NPU_KEEP_AS)


@dataclass
class GenerationGraphsConfig:
    """The NPU's generation graphs (static_llm): AR-N prefill and AR-1 decode over a fixed context, in parts."""

    prefill_len: int = field(default=32, metadata=_help("AR-N: prompt tokens per prefill call (128 for Qwen2-1.5B)"))
    context_length: int = field(default=256, metadata=_help("CL: positions a graph sees, past slots + new tokens"))
    parts: int = field(default=2, metadata=_help("graphs the decoder is cut into (embedding in the first, lm_head in "
                                                 "the last, decoder layers split evenly)"))
    max_part_mb: float = field(default=1536.0, metadata=_help("per-graph bound on 8-bit weight bytes (HTP allocates at "
                                                              "most 2048 MB per graph, activations included)"))
    precisions: list[str] = field(default_factory=list, metadata=_help("QDQ recipes (compile.recipes) to compile "
                                                                       "the parts with (matrix)"))
    share: bool = field(default=True, metadata=_help("one context binary per part for AR-N and AR-1 (one weight "
                                                     "copy); false ships the unshared binaries"))
    calib_new_tokens: int = field(default=8, metadata=_help("decode steps per calibration prompt (AR-1 traces)"))
    verify_prompts: int = field(default=4, metadata=_help("held-out prompts generated on the HTP backend and "
                                                          "compared with FP32 greedy generation"))
    verify_new_tokens: int = field(default=16, metadata=_help("tokens generated per verification prompt"))

    def check(self) -> None:
        _require(self.prefill_len > 1, f"compile.generation.prefill_len must be > 1 (the decode graph is AR-1), got "
                                       f"{self.prefill_len}")
        _require(self.context_length > self.prefill_len,
                 f"compile.generation.context_length ({self.context_length}) must exceed prefill_len "
                 f"({self.prefill_len})")
        _require(self.parts >= 1 and self.max_part_mb > 0,
                 f"compile.generation.parts must be >= 1 and max_part_mb > 0, got {self.parts} and {self.max_part_mb}")
        _require(self.calib_new_tokens >= 1 and self.verify_prompts >= 0 and self.verify_new_tokens >= 1,
                 "compile.generation.calib_new_tokens and verify_new_tokens must be >= 1, verify_prompts >= 0")


@dataclass
class CompileConfig:
    precisions: list[str] = field(default_factory=list, metadata=_help("QDQ recipes to compile (matrix)"))
    seq_lens: list[int] = field(default_factory=list, metadata=_help("static sequence lengths (matrix)"))
    recipes: dict[str, QdqRecipeConfig] = field(default_factory=dict)
    opset: int = field(default=17, metadata=_help("opset of the static FP32 export"))
    mask_value: float = field(default=-100.0, metadata=_help("additive causal mask value above the diagonal"))
    rmsnorm: str = field(default="fused", metadata=_help("fused: one SimplifiedLayerNormalization node (HTP RmsNorm); "
                                                         "decomposed: Pow/ReduceMean/Sqrt/Div as PyTorch traces it"))
    calib_samples: int = field(default=16, metadata=_help("calibration windows (calib split)"))
    verify_samples: int = field(default=4, metadata=_help("held-out windows run on the QNN backend"))
    verify_workers: int = field(default=2, metadata=_help("processes verification runs in on the x86_64 emulator, one "
                                                          "pinned per core (1.65x on 2 cores); 1 on a device"))
    allow_cpu_fallback: bool = field(default=False, metadata=_help("accept compute nodes outside the context"))
    mode: str = field(default="fail", metadata=_help("fail | warn when under the fidelity gate"))
    gates: dict[str, GateConfig] = field(default_factory=dict)
    generation: GenerationGraphsConfig = field(default_factory=GenerationGraphsConfig)

    def check(self) -> None:
        for name in self.generation.precisions:
            _require(name in self.recipes, f"compile.generation.precisions lists unknown precision {name!r}: valid "
                                           f"ones are {', '.join(self.recipes)}")
        for name in self.precisions:
            _require(name in self.recipes, f"compile.precisions lists unknown precision {name!r}: valid ones are "
                     f"{', '.join(self.recipes)} (add a recipe under compile.recipes)")
        for seq in self.seq_lens:
            _require(seq > 1, f"compile.seq_lens must be > 1, got {seq}")
        _require(self.calib_samples > 0 and self.verify_samples > 0,
                 f"compile.calib_samples and compile.verify_samples must be > 0, got {self.calib_samples} and "
                 f"{self.verify_samples}")
        _require(self.verify_workers >= 1, f"compile.verify_workers must be >= 1, got {self.verify_workers}")
        _require(self.mode in GATE_MODES, f"compile.mode must be one of {', '.join(GATE_MODES)}")
        _require(self.mask_value < 0, f"compile.mask_value must be negative, got {self.mask_value}")
        _require(self.rmsnorm in RMSNORM_FORMS, f"compile.rmsnorm must be one of {', '.join(RMSNORM_FORMS)}")
        _check_gates(self.gates, "compile")
        for name, recipe in self.recipes.items():
            try:
                recipe.check()
            except AntinetError as exc:
                raise AntinetError(f"compile.recipes.{name}: {exc}") from None

    def gate(self, precision: str) -> GateConfig:
        return gate_for(self.gates, precision)

    def gate_mode(self, precision: str) -> str:
        return self.gate(precision).mode or self.mode


BACKENDS = ("torch", "ort-cpu", "qnn-htp", "qnn-gpu", "qai-appbuilder", "ort-genai")
GENAI_PRECISIONS = ("int4", "int8", "fp16", "fp32")


@dataclass
class BenchRunConfig:
    """One benchmark: a backend running one artifact at one sequence length (key: <backend>-<precision>-<S>)."""

    backend: str = field(default=MISSING, metadata=_help(", ".join(BACKENDS)))
    precision: str = field(default=MISSING, metadata=_help("fp32, a quantize precision, or an NPU precision"))
    seq_len: int = field(default=MISSING)
    model: str = field(default=MISSING, metadata=_help("artifact under models/ that the backend loads"))
    weights: str = field(default=MISSING, metadata=_help("its weights under models/ (so DVC sees changes)"))


@dataclass
class GenRunConfig:
    """One generation benchmark: a backend generating from one artifact (key: <backend>-<precision>[-nocache])."""

    backend: str = field(default=MISSING, metadata=_help("ort-cpu | torch | ort-genai"))
    precision: str = field(default=MISSING)
    model: str = field(default=MISSING, metadata=_help("artifact under models/ that the backend loads"))
    weights: str = field(default=MISSING, metadata=_help("its weights under models/ (so DVC sees changes)"))
    cache: bool = field(default=True, metadata=_help("false: no KV cache, the whole prefix re-run for every new "
                                                     "token (the baseline a single-pass graph allows)"))
    new_tokens: Optional[int] = field(default=None, metadata=_help("tokens per prompt for this run (null: "
                                                                   "bench.generation.new_tokens)"))


@dataclass
class GenerationBenchConfig:
    """Prefill + decode: time to first token and decode tokens/s, per run and prompt length."""

    runs: dict[str, GenRunConfig] = field(default_factory=dict, metadata=_help("the bench-gen matrix"))
    prompt_lens: list[int] = field(default_factory=lambda: [32, 128], metadata=_help("prompt tokens P"))
    new_tokens: int = field(default=64, metadata=_help("tokens generated per prompt G (greedy, EOS ignored)"))
    warmup: int = field(default=1, metadata=_help("untimed generations per prompt length"))
    iterations: int = field(default=3, metadata=_help("timed generations per prompt length"))
    genai_precisions: list[str] = field(default_factory=lambda: ["int4", "int8", "fp32"],
                                        metadata=_help("onnxruntime-genai models built (export-genai) for the peer"))

    def check(self) -> None:
        _require(bool(self.prompt_lens) and all(p > 0 for p in self.prompt_lens) and self.new_tokens > 1,
                 f"bench.generation.prompt_lens must be positive and new_tokens > 1, got {self.prompt_lens} and "
                 f"{self.new_tokens}")
        _require(self.warmup >= 0 and self.iterations > 0,
                 f"bench.generation.warmup must be >= 0 and iterations > 0, got {self.warmup} and {self.iterations}")
        for p in self.genai_precisions:
            _require(p in GENAI_PRECISIONS, f"bench.generation.genai_precisions: {p!r} is not one of "
                     f"{', '.join(GENAI_PRECISIONS)}")
        for key, run in self.runs.items():
            _require(run.backend in ("ort-cpu", "torch", "ort-genai", "qnn-htp"),
                     f"bench.generation.runs.{key}: backend {run.backend!r} cannot generate: use ort-cpu, torch, "
                     "ort-genai or qnn-htp (the compile-gen parts)")
            _require(run.new_tokens is None or run.new_tokens > 1,
                     f"bench.generation.runs.{key}.new_tokens must be > 1 or null, got {run.new_tokens}")
            expected = f"{run.backend}-{run.precision}" + ("" if run.cache else "-nocache")
            _require(key == expected, f"bench.generation.runs.{key} must be named {expected}")


@dataclass
class BenchConfig:
    runs: dict[str, BenchRunConfig] = field(default_factory=dict, metadata=_help("the bench matrix"))
    generation: GenerationBenchConfig = field(default_factory=GenerationBenchConfig)
    warmup: int = field(default=3, metadata=_help("untimed runs after loading (the seed warms up 3 times)"))
    iterations: int = field(default=10, metadata=_help("timed runs"))
    threads: int = field(default=0, metadata=_help("CPU intra-op threads for torch / ort-cpu (0: all cores)"))
    perf_mode: str = field(default="burst", metadata=_help("NPU performance mode: " + ", ".join(HTP_PERF_MODES)))
    budget_ms: float = field(default=500.0, metadata=_help("latency budget per forward pass (the seed's 500 ms)"))
    fallback: list[str] = field(default_factory=list,
                                metadata=_help("backends tried in order when one is unavailable or fails"))
    fallback_cpu_precision: str = field(default="int8-block",
                                        metadata=_help("what ort-cpu runs when it stands in for an NPU backend"))
    appbuilder_lib_path: str = field(default="None", metadata=_help("QNN libraries for AppBuilder ('None': its own)"))

    def check(self) -> None:
        _require(self.warmup >= 0 and self.iterations > 0, f"bench.warmup must be >= 0 and bench.iterations > 0, "
                 f"got {self.warmup} and {self.iterations}")
        _require(self.budget_ms > 0, f"bench.budget_ms must be positive, got {self.budget_ms}")
        _require(self.perf_mode in HTP_PERF_MODES, f"unknown bench.perf_mode {self.perf_mode!r}: choose one of "
                 f"{', '.join(HTP_PERF_MODES)}")
        for name in self.fallback:
            _require(name in BACKENDS, f"unknown backend {name!r} in bench.fallback: choose from {', '.join(BACKENDS)}")
        self.generation.check()
        for key, run in self.runs.items():
            _require(run.backend in BACKENDS and run.backend != "ort-genai",
                     f"bench.runs.{key}: unknown backend {run.backend!r}: choose one of "
                     f"{', '.join(b for b in BACKENDS if b != 'ort-genai')}")
            _require(key == f"{run.backend}-{run.precision}-{run.seq_len}",
                     f"bench.runs.{key} must be named {run.backend}-{run.precision}-{run.seq_len}")


@dataclass
class ServeConfig:
    run: str = field(default="ort-cpu-int8-block-128",
                     metadata=_help("a key of bench.runs: the artifact and backend to serve (fallback chain applies)"))
    host: str = "127.0.0.1"
    port: int = 8000
    warmup: int = field(default=3, metadata=_help("forward passes after loading, before the model is ready"))
    max_new_tokens: int = field(default=64, metadata=_help("upper bound a request may ask for"))

    def check(self) -> None:
        _require(0 < self.port < 65536, f"serve.port must be 1..65535, got {self.port}")
        _require(self.warmup >= 0 and self.max_new_tokens >= 0, "serve.warmup and serve.max_new_tokens must be "
                 f">= 0, got {self.warmup} and {self.max_new_tokens}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)

    def check(self) -> None:
        recipes = [(f"quantize.recipes.{k}", r) for k, r in self.quantize.recipes.items()]
        recipes += [(f"compile.recipes.{k}", r) for k, r in self.compile.recipes.items()]
        for where, recipe in recipes:
            _require(recipe.mixed is None or recipe.mixed.probe in self.sensitivity.probes,
                     f"{where}.mixed.probe {getattr(recipe.mixed, 'probe', '')!r} is not a key of sensitivity.probes "
                     f"(valid: {', '.join(self.sensitivity.probes) or 'none'})")
        _require(self.serve.run in self.bench.runs,
                 f"serve.run {self.serve.run!r} is not a key of bench.runs: choose one of {', '.join(self.bench.runs)}")


def load(params: str | Path = PARAMS_FILE, overrides: list[str] | None = None) -> Config:
    """The validated config: `params.yaml` as DVC tracks it, or `conf/` composed with Hydra `overrides`."""
    if overrides:
        return validate(compose(overrides), source=f"{CONF_DIR}/ with overrides {' '.join(overrides)}")
    path = Path(params)
    _require(path.is_file(), f"{path} not found: run from the project root, or write it with `antinet-npu compose`")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry multi-line context
        raise AntinetError(f"{path} is not valid YAML: {_first_line(exc)}") from None
    return validate(raw, source=str(path))


def validate(raw: Any, source: str) -> Config:
    """Merge `raw` onto the schema and build the typed tree; every failure is one line naming the key."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg = OmegaConf.to_object(merged)
    except oc_errors.ConfigKeyError as exc:
        raise AntinetError(f"{source}: unknown key '{exc.full_key}'{_valid_keys_hint(exc.full_key)}") from None
    except oc_errors.MissingMandatoryValue as exc:
        raise AntinetError(f"{source}: required key '{exc.full_key}' is not set") from None
    except oc_errors.ValidationError as exc:
        raise AntinetError(f"{source}: bad value for '{exc.full_key}': {_first_line(exc)}") from None
    except oc_errors.OmegaConfBaseException as exc:
        raise AntinetError(f"{source}: {_first_line(exc)}") from None
    try:
        _check_tree(cfg)
    except AntinetError as exc:
        raise AntinetError(f"{source}: {exc}") from None
    assert isinstance(cfg, Config)
    return cfg


def _check_tree(node: Any) -> None:
    """Run every section's `check()` (value rules that types alone cannot express)."""
    if not is_dataclass(node):
        return
    for f in fields(node):
        _check_tree(getattr(node, f.name))
    if hasattr(node, "check"):
        node.check()


def compose(overrides: list[str] | None = None, conf_dir: str | Path = CONF_DIR) -> Any:
    """Compose `conf/` exactly as `dvc exp run` does (Hydra compose, then resolve)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf = Path(conf_dir).resolve()
    _require(conf.is_dir(), f"config folder {conf} not found: run from the project root")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise AntinetError(f"cannot compose {conf_dir}/: {_compose_hint(exc, conf)}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def to_yaml(cfg: Any) -> str:
    """YAML exactly as DVC writes `params.yaml` after composing."""
    return OmegaConf.to_yaml(cfg)


def _compose_hint(exc: Exception, conf: Path) -> str:
    msg = _first_line(exc)
    m = re.search(r"Could not find '([^/']+)/([^']+)'", str(exc))
    if m:
        group = m.group(1)
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        return f"no option '{m.group(2)}' in group '{group}' (choose one of: {', '.join(options)})"
    return msg


def _valid_keys_hint(full_key: str) -> str:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node: Any = Config
    for part in filter(None, parent.split(".")):
        hint = get_type_hints(node).get(part)
        node = next((a for a in (*get_args(hint), hint) if is_dataclass(a)), None)
        if node is None:
            return ""
    where = f"under '{parent}'" if parent else "at top level"
    return f" (valid keys {where}: {', '.join(f.name for f in fields(node))})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
