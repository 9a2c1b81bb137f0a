"""CPU variants and how faithful they are: `sensitivity` probes, `quantize` recipes, `evaluate` gates."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from antinet_npu import AntinetError
from antinet_npu.config.schema import SLUG, doc, require

GRANULARITIES = ("block", "channel", "tensor")


@dataclass
class ProbeConfig:
    """The numeric damage of a recipe family, simulated on the PyTorch model (fake quantization) by `sensitivity`."""

    weight_bits: int = field(default=8, metadata=doc("bits per weight"))
    weight_granularity: str = field(default="block", metadata=doc("block | channel | tensor: what shares a scale"))
    block_size: int = field(default=32, metadata=doc("values per scale along K, for block granularity"))
    weight_symmetric: bool = True
    weight_zero: str = field(default="integer", metadata=doc(
        "asymmetric weights: integer (a zero point, the range stretched to hold 0) | float (the block's own minimum "
        "as a float offset: llama.cpp's Q4_1, compile's block_offsets)"))
    activation_bits: Optional[int] = field(default=None, metadata=doc("inputs of the quantized MatMuls "
                                                                        "fake-quantized too (null: weights only)"))
    activation_granularity: str = field(default="block", metadata=doc("block (per row, as MatMulNBits "
                                                                         "accuracy_level 4 does) | tensor"))
    activation_symmetric: bool = True

    def check(self) -> None:
        require(2 <= self.weight_bits <= 16, f"weight_bits must be 2..16, got {self.weight_bits}")
        require(self.activation_bits is None or 2 <= self.activation_bits <= 16,
                 f"activation_bits must be 2..16 or null, got {self.activation_bits}")
        require(self.weight_granularity in GRANULARITIES and self.activation_granularity in GRANULARITIES,
                 f"weight_granularity and activation_granularity must be one of {', '.join(GRANULARITIES)}")
        require(self.block_size > 0, f"block_size must be positive, got {self.block_size}")
        require(self.weight_zero in ("integer", "float"), f"weight_zero must be integer or float, got "
                 f"{self.weight_zero!r}")


@dataclass
class SensitivityConfig:
    """Per-layer-group damage of each probe (the `sensitivity` matrix), measured on calibration text."""

    probes: dict[str, ProbeConfig] = field(default_factory=dict, metadata=doc("probe name -> damage model"))
    num_samples: int = field(default=8, metadata=doc("calibration windows of seq_len tokens"))
    seq_len: int = 128
    threads: int = field(default=0, metadata=doc("torch threads (0: all cores)"))

    def check(self) -> None:
        require(self.num_samples > 0 and self.seq_len > 1, f"sensitivity.num_samples must be > 0 and seq_len > 1, "
                 f"got {self.num_samples} and {self.seq_len}")
        for name, probe in self.probes.items():
            require(bool(SLUG.match(name)), f"sensitivity.probes: bad probe name {name!r}")
            try:
                probe.check()
            except AntinetError as exc:
                raise AntinetError(f"sensitivity.probes.{name}: {exc}") from None


@dataclass
class MixedConfig:
    """Keep a recipe's most sensitive layer groups (ranked by a sensitivity probe) at a higher precision."""

    probe: str = field(default=MISSING, metadata=doc("a key of sensitivity.probes whose ranking is used"))
    keep: int = field(default=0, metadata=doc("how many of the most sensitive groups to keep"))
    keep_as: str = field(default="float", metadata=doc("CPU: float | 8bit (8-bit blocks of block_size) | "
                                                         "fp32-compute (same bits, float activations: slow on CPU); "
                                                         "NPU: w16 (16-bit weights) | w8 (8-bit weights, for a 4-bit "
                                                         "recipe) | float (fp16 on HTP)"))
    block_size: Optional[int] = field(default=None, metadata=doc("keep_as 8bit: block size of the kept groups "
                                                                   "(null: the recipe's); smaller blocks also "
                                                                   "quantize their activations in smaller blocks"))

    def check(self, allowed: tuple[str, ...]) -> None:
        require(self.keep >= 0, f"mixed.keep must be >= 0, got {self.keep}")
        require(self.keep_as in allowed, f"mixed.keep_as must be one of {', '.join(allowed)}, got {self.keep_as!r}")
        require(self.block_size is None or (self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0),
                 f"mixed.block_size must be a power of 2 >= 16, got {self.block_size}")


@dataclass
class SmoothConfig:
    """Activation smoothing (SmoothQuant-style) folded into the float weights before quantization."""

    alpha: float = field(default=0.5, metadata=doc("how much of an activation channel's range moves into the weights "
                                                    "(0..1): s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)"))
    samples: int = field(default=8, metadata=doc("calibration windows (calibration text) for max|x_j|"))
    seq_len: int = field(default=128, metadata=doc("tokens per calibration window"))

    def check(self) -> None:
        require(0 < self.alpha < 1, f"smooth.alpha must be between 0 and 1 (exclusive), got {self.alpha}")
        require(self.samples >= 1 and self.seq_len >= 1,
                 f"smooth.samples and smooth.seq_len must be >= 1, got {self.samples} and {self.seq_len}")


CPU_KEEP_AS = ("float", "8bit", "fp32-compute")
NPU_KEEP_AS = ("w16", "w8", "float")
NPU_KEEP_BITS = {"w16": "QInt16", "w8": "QInt8"}  # keep_as -> the kept MatMuls' weight type


QUANT_METHODS = ("fp16", "dynamic-int8", "matmul-nbits")
WEIGHT_TYPES = ("QUInt8", "QInt8")
NBITS_ALGORITHMS = ("rtn", "hqq")


@dataclass
class RecipeConfig:
    """How one CPU precision variant is made from the FP32 ONNX model. Fields apply to the methods noted."""

    method: str = field(default=MISSING, metadata=doc("fp16 | dynamic-int8 | matmul-nbits"))
    nodes_to_exclude: list[str] = field(default_factory=list, metadata=doc("node names left in float32"))
    keep_io_types: bool = field(default=True, metadata=doc("fp16: keep float32 graph inputs and outputs"))
    op_block_list: list[str] = field(default_factory=list,
                                     metadata=doc("fp16: op types left in float32 (empty: onnxruntime default)"))
    weight_type: str = field(default="QUInt8", metadata=doc("dynamic-int8: QUInt8 (the seed's recipe) or QInt8"))
    per_channel: bool = field(default=False, metadata=doc("dynamic-int8: per-channel weight scales"))
    reduce_range: bool = field(default=False, metadata=doc("dynamic-int8: 7-bit weights"))
    op_types: list[str] = field(default_factory=list,
                                metadata=doc("dynamic-int8: op types to quantize (empty: all supported)"))
    bits: int = field(default=8, metadata=doc("matmul-nbits: 8 or 4 bits per weight"))
    block_size: int = field(default=32, metadata=doc("matmul-nbits: weights per scale (power of 2, >= 16)"))
    symmetric: bool = field(default=True, metadata=doc("matmul-nbits: no zero points"))
    accuracy_level: int = field(default=4, metadata=doc("matmul-nbits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8"))
    algorithm: str = field(default="rtn", metadata=doc("matmul-nbits: rtn (round to nearest) | hqq (half-quadratic "
                                                         "optimisation of scales and zero points; 4 bits only)"))
    eight_bit_nodes: list[str] = field(default_factory=list,
                                       metadata=doc("matmul-nbits 4-bit: MatMul nodes kept at 8 bits (e.g. lm_head)"))
    fuse_siblings: bool = field(default=True, metadata=doc("matmul-nbits: one MatMulNBits for the MatMuls that read "
                                                             "the same input (q/k/v, gate/up): same weights, fewer "
                                                             "kernel calls"))
    mixed: Optional[MixedConfig] = field(default=None, metadata=doc("matmul-nbits / dynamic-int8: keep the most "
                                                                      "sensitive layer groups at higher precision"))
    smooth: Optional[SmoothConfig] = field(default=None, metadata=doc("matmul-nbits: move activation outliers into "
                                                                        "the weights first (same graph, same speed)"))

    def check(self) -> None:
        require(self.method in QUANT_METHODS,
                 f"unknown quantization method {self.method!r}: choose one of {', '.join(QUANT_METHODS)}")
        require(self.weight_type in WEIGHT_TYPES, f"weight_type must be one of {', '.join(WEIGHT_TYPES)}")
        require(self.bits in (4, 8), f"bits must be 4 or 8, got {self.bits}")
        require(self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0,
                 f"block_size must be a power of 2 >= 16, got {self.block_size}")
        require(0 <= self.accuracy_level <= 4, f"accuracy_level must be 0..4, got {self.accuracy_level}")
        require(self.algorithm in NBITS_ALGORITHMS,
                 f"algorithm must be one of {', '.join(NBITS_ALGORITHMS)}, got {self.algorithm!r}")
        require(self.algorithm != "hqq" or self.bits == 4, "algorithm hqq needs bits: 4")
        require(not self.eight_bit_nodes or self.bits == 4, "eight_bit_nodes applies to bits: 4 only")
        if self.mixed is not None:
            require(self.method != "fp16", "mixed applies to matmul-nbits and dynamic-int8 recipes")
            self.mixed.check(CPU_KEEP_AS)
            require(self.mixed.keep_as != "8bit" or self.method == "matmul-nbits",
                     "mixed.keep_as 8bit needs a matmul-nbits recipe")
            require(self.mixed.keep_as != "fp32-compute" or self.method == "matmul-nbits",
                     "mixed.keep_as fp32-compute needs a matmul-nbits recipe")
        if self.smooth is not None:
            require(self.method == "matmul-nbits", "smooth needs a matmul-nbits recipe")
            self.smooth.check()


@dataclass
class QuantizeConfig:
    precisions: list[str] = field(default_factory=list, metadata=doc("recipes to build (the quantize matrix)"))
    recipes: dict[str, RecipeConfig] = field(default_factory=dict, metadata=doc("precision name -> recipe"))

    def check(self) -> None:
        for name in self.precisions:
            require(name in self.recipes, f"quantize.precisions lists unknown precision {name!r}: valid ones are "
                     f"{', '.join(self.recipes)} (add a recipe under quantize.recipes)")
        require(len(set(self.precisions)) == len(self.precisions), "quantize.precisions has duplicates")
        for name, recipe in self.recipes.items():
            require(bool(SLUG.match(name)) and name != REFERENCE, f"quantize.recipes: bad precision name {name!r}")
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
    max_ppl_increase: Optional[float] = field(default=None, metadata=doc("relative, 0.01 = +1 % perplexity"))
    mode: Optional[str] = field(default=None, metadata=doc("fail | warn for this variant; null: the section's mode"))

    def check(self) -> None:
        require(self.mode is None or self.mode in GATE_MODES,
                 f"gate mode must be one of {', '.join(GATE_MODES)} or null, got {self.mode!r}")


def check_gates(gates: dict[str, GateConfig], section: str) -> None:
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
                                     metadata=doc("precision -> ONNX file under models/onnx/ (the matrix)"))
    num_samples: int = field(default=16, metadata=doc("held-out windows of seq_len tokens"))
    seq_len: int = 128
    threads: int = field(default=0, metadata=doc("onnxruntime intra-op threads (0: all cores)"))
    gen_prompts: int = field(default=4, metadata=doc("held-out prompts continued greedily by FP32 and the "
                                                       "variant (generation agreement; 0: skip)"))
    prompt_len: int = 32
    gen_tokens: int = field(default=32, metadata=doc("new tokens per prompt"))
    mode: str = field(default="fail", metadata=doc("fail: a variant under its gate fails the stage; warn: logs"))
    gates: dict[str, GateConfig] = field(default_factory=dict,
                                         metadata=doc("precision -> gate; 'default' for the others"))

    def check(self) -> None:
        require(self.num_samples > 0 and self.seq_len > 1,
                 f"evaluate.num_samples must be > 0 and seq_len > 1, got {self.num_samples} and {self.seq_len}")
        require(self.gen_prompts >= 0 and self.prompt_len > 0 and self.gen_tokens > 0,
                 f"evaluate.gen_prompts must be >= 0, prompt_len and gen_tokens > 0, got {self.gen_prompts}, "
                 f"{self.prompt_len}, {self.gen_tokens}")
        require(self.mode in GATE_MODES, f"evaluate.mode must be one of {', '.join(GATE_MODES)}")
        require(REFERENCE in self.variants, "evaluate.variants must include fp32 (the reference)")
        check_gates(self.gates, "evaluate")

    def gate(self, precision: str) -> GateConfig:
        return gate_for(self.gates, precision)

    def gate_mode(self, precision: str) -> str:
        return self.gate(precision).mode or self.mode
