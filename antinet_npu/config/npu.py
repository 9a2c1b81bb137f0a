"""The NPU: the HTP `target`, QDQ recipes, generation graphs and their `compile` settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from antinet_npu import AntinetError
from antinet_npu.config.recipes import GATE_MODES, NPU_KEEP_AS, GateConfig, MixedConfig, check_gates, gate_for
from antinet_npu.config.schema import doc, require

HTP_PERF_MODES = ("burst", "balanced", "default", "high_performance", "power_saver", "low_power_saver",
                  "high_power_saver", "extreme_power_saver", "sustained_high_performance")


@dataclass
class TargetConfig:
    """The NPU the context binaries are compiled for (QNN EP provider options)."""

    name: str = field(default="snapdragon-x-elite", metadata=doc("label recorded in metrics"))
    soc_model: int = field(default=60, metadata=doc("QNN SoC id: 60 = Snapdragon X Elite"))
    htp_arch: int = field(default=73, metadata=doc("Hexagon architecture version (v73)"))
    htp_performance_mode: str = field(default="burst", metadata=doc(", ".join(HTP_PERF_MODES)))
    htp_graph_finalization_optimization_mode: int = field(default=3, metadata=doc("0 (fast) .. 3 (best)"))

    def check(self) -> None:
        require(self.htp_performance_mode in HTP_PERF_MODES,
                 f"target.htp_performance_mode must be one of {', '.join(HTP_PERF_MODES)}")
        require(0 <= self.htp_graph_finalization_optimization_mode <= 3,
                 "target.htp_graph_finalization_optimization_mode must be 0..3")


RMSNORM_FORMS = ("fused", "decomposed")
QDQ_TYPES = ("QUInt8", "QInt8", "QUInt16", "QInt16")
WEIGHT_ONLY_TYPES = ("QInt4",)  # MatMul weights only; the embedding table is quantized as an activation
NPU_METHODS = ("qdq", "fp16")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")


@dataclass
class QdqRecipeConfig:
    """Static QDQ quantization for the HTP backend (onnxruntime's get_qnn_qdq_config), or none (method fp16)."""

    method: str = field(default="qdq", metadata=doc(
        "qdq: static QDQ as below; fp16: no quantization, the float graph compiled at fp16 precision on HTP "
        "(enable_htp_fp16_precision; generation parts only): the float reference a quantized recipe is judged by"))
    activation_type: str = field(default="QUInt16", metadata=doc(", ".join(QDQ_TYPES)))
    weight_type: str = field(default="QUInt8", metadata=doc(", ".join(QDQ_TYPES + WEIGHT_ONLY_TYPES) + " (QInt4: "
                                                             "the MatMuls' weights, per channel; other weights QInt8, "
                                                             "the embedding table as the activations)"))
    per_channel: bool = field(default=False, metadata=doc("per-output-channel symmetric weights (MatMul, Conv); "
                                                             "needs a signed weight_type"))
    block_size: int = field(default=0, metadata=doc("QInt4 MatMul weights: 0 = one scale per output channel; N = "
                                                      "one per N values along K (HTP: symmetric, no zero point)"))
    block_offsets: bool = field(default=False, metadata=doc(
        "with block_size: asymmetric blocks (min-max, a float offset per block, llama.cpp's Q4_1) on HTP's symmetric "
        "ones: W = s(q - 8) + c, the offsets c (K/block x N, 16-bit per channel) times the block sums of x"))
    calibrate_method: str = field(default="MinMax", metadata=doc(", ".join(CALIBRATION_METHODS)))
    activation_symmetric: bool = False
    nodes_to_exclude: list[str] = field(default_factory=list)
    float_residual: bool = field(default=False, metadata=doc("the residual stream (its Adds and the nodes "
                                                                "reading it: RMSNorms) stays float, fp16 on HTP: "
                                                                "massive activations span ~26000 in SmolLM2"))
    float_outliers: Optional[float] = field(default=None, metadata=doc(
        "keep float (fp16 on HTP) each MatMul input whose activation step (its calibrated range / 2^bits) exceeds "
        "this fraction of its median |x| on the calibration feeds, with the node that makes it and the MatMuls "
        "that read it: the massive activations of an MLP product (SmolLM2-135M: 3347 in layer 11, median 0.08); "
        "null: none"))
    mixed: Optional[MixedConfig] = field(default=None, metadata=doc("keep the most sensitive layer groups at 16-bit "
                                                                      "weights (keep_as: w16) or float"))
    kv_type: Optional[str] = field(default=None, metadata=doc("generation graphs: the KV cache's inputs and outputs "
                                                                "(past_*), e.g. QUInt8 to halve its traffic; null: "
                                                                "activation_type"))
    verify_samples: Optional[int] = field(default=None, metadata=doc(
        "held-out windows per text domain this recipe is verified on (null: compile.verify_samples): a looser gate "
        "is resolved by fewer, and each window costs seconds of emulation"))

    @property
    def fp16(self) -> bool:
        return self.method == "fp16"

    def check(self) -> None:
        require(self.method in NPU_METHODS, f"method must be one of {', '.join(NPU_METHODS)}, got {self.method!r}")
        require(not (self.fp16 and self.mixed), "method fp16 quantizes nothing: drop mixed")
        require(self.kv_type is None or self.kv_type in QDQ_TYPES, f"kv_type must be null or one of "
                 f"{', '.join(QDQ_TYPES)}, got {self.kv_type!r}")
        require(self.activation_type in QDQ_TYPES, f"activation_type must be one of {', '.join(QDQ_TYPES)}, "
                 f"got {self.activation_type!r}")
        require(self.weight_type in QDQ_TYPES + WEIGHT_ONLY_TYPES,
                 f"weight_type must be one of {', '.join(QDQ_TYPES + WEIGHT_ONLY_TYPES)}, got {self.weight_type!r}")
        require(self.weight_type not in WEIGHT_ONLY_TYPES or self.per_channel,
                 f"weight_type {self.weight_type} is per output channel: set per_channel true")
        require(not self.per_channel or self.weight_type.startswith("QInt"),
                 f"per_channel weights are symmetric: use weight_type QInt4, QInt8 or QInt16, not {self.weight_type}")
        require(self.block_size >= 0 and (self.block_size == 0 or self.weight_type in WEIGHT_ONLY_TYPES),
                 f"block_size {self.block_size} is for weight_type {', '.join(WEIGHT_ONLY_TYPES)} (0: per channel)")
        require(not self.block_offsets or self.block_size, "block_offsets needs block_size > 0 (offsets per block)")
        require(self.float_outliers is None or self.float_outliers > 0,
                 f"float_outliers must be null or > 0 (a fraction of the median |x|), got {self.float_outliers}")
        require(self.calibrate_method in CALIBRATION_METHODS,
                 f"calibrate_method must be one of {', '.join(CALIBRATION_METHODS)}")
        require(self.verify_samples is None or self.verify_samples > 0,
                 f"verify_samples must be null or > 0, got {self.verify_samples}")
        if self.mixed is not None:
            self.mixed.check(NPU_KEEP_AS)


@dataclass
class GenerationGraphsConfig:
    """The NPU's generation graphs (static_llm): AR-N prefill and AR-1 decode over a fixed context, in parts."""

    prefill_len: int = field(default=32, metadata=doc("AR-N: prompt tokens per prefill call (128 for Qwen2-1.5B)"))
    context_length: int = field(default=256, metadata=doc("CL: positions a graph sees, past slots + new tokens"))
    parts: int = field(default=2, metadata=doc("graphs the decoder is cut into (embedding in the first, lm_head in "
                                                 "the last, decoder layers split evenly)"))
    max_part_mb: float = field(default=1536.0, metadata=doc("per-graph bound on 8-bit weight bytes (HTP allocates at "
                                                              "most 2048 MB per graph, activations included)"))
    precisions: list[str] = field(default_factory=list, metadata=doc("QDQ recipes (compile.recipes) to compile "
                                                                       "the parts with (matrix)"))
    quantized_io: bool = field(default=True, metadata=doc(
        "graphs take and give integer tensors (the activation type; kv_type for the cache) as AI Hub's do: half "
        "the bytes per step of float32 at 16 bits; one encoding per cache and part-boundary tensor"))
    share: bool = field(default=True, metadata=doc("one context binary per part for AR-N and AR-1 (one weight "
                                                     "copy); false ships the unshared binaries"))
    calib_new_tokens: int = field(default=8, metadata=doc("decode steps per calibration prompt (AR-1 traces)"))
    verify_prompts: int = field(default=4, metadata=doc("held-out prompts generated on the HTP backend and "
                                                          "compared with FP32 greedy generation"))
    verify_new_tokens: int = field(default=16, metadata=doc("tokens generated per verification prompt"))

    def check(self) -> None:
        require(self.prefill_len > 1, f"compile.generation.prefill_len must be > 1 (the decode graph is AR-1), got "
                                       f"{self.prefill_len}")
        require(self.context_length > self.prefill_len,
                 f"compile.generation.context_length ({self.context_length}) must exceed prefill_len "
                 f"({self.prefill_len})")
        require(self.parts >= 1 and self.max_part_mb > 0,
                 f"compile.generation.parts must be >= 1 and max_part_mb > 0, got {self.parts} and {self.max_part_mb}")
        require(self.calib_new_tokens >= 1 and self.verify_prompts >= 0 and self.verify_new_tokens >= 1,
                 "compile.generation.calib_new_tokens and verify_new_tokens must be >= 1, verify_prompts >= 0")


@dataclass
class CompileConfig:
    precisions: list[str] = field(default_factory=list, metadata=doc("QDQ recipes to compile (matrix)"))
    seq_lens: list[int] = field(default_factory=list, metadata=doc("static sequence lengths (matrix)"))
    recipes: dict[str, QdqRecipeConfig] = field(default_factory=dict)
    opset: int = field(default=17, metadata=doc("opset of the static FP32 export"))
    mask_value: float = field(default=-100.0, metadata=doc("additive causal mask value above the diagonal"))
    rmsnorm: str = field(default="fused", metadata=doc("fused: one SimplifiedLayerNormalization node (HTP RmsNorm); "
                                                         "decomposed: Pow/ReduceMean/Sqrt/Div as PyTorch traces it"))
    calib_samples: int = field(default=16, metadata=doc("calibration windows (calib split)"))
    verify_samples: int = field(default=4, metadata=doc("held-out windows run on the QNN backend"))
    verify_workers: int = field(default=2, metadata=doc("processes verification runs in on the x86_64 emulator, one "
                                                          "pinned per core (1.65x on 2 cores); 1 on a device"))
    allow_cpu_fallback: bool = field(default=False, metadata=doc("accept compute nodes outside the context"))
    mode: str = field(default="fail", metadata=doc("fail | warn when under the fidelity gate"))
    gates: dict[str, GateConfig] = field(default_factory=dict)
    generation: GenerationGraphsConfig = field(default_factory=GenerationGraphsConfig)

    def check(self) -> None:
        for name in self.generation.precisions:
            require(name in self.recipes, f"compile.generation.precisions lists unknown precision {name!r}: valid "
                                           f"ones are {', '.join(self.recipes)}")
        for name in self.precisions:
            require(name in self.recipes, f"compile.precisions lists unknown precision {name!r}: valid ones are "
                     f"{', '.join(self.recipes)} (add a recipe under compile.recipes)")
            require(not self.recipes[name].fp16, f"compile.precisions: {name!r} (method fp16) is built for the "
                                                 "generation parts only: list it in compile.generation.precisions")
        for seq in self.seq_lens:
            require(seq > 1, f"compile.seq_lens must be > 1, got {seq}")
        require(self.calib_samples > 0 and self.verify_samples > 0,
                 f"compile.calib_samples and compile.verify_samples must be > 0, got {self.calib_samples} and "
                 f"{self.verify_samples}")
        require(self.verify_workers >= 1, f"compile.verify_workers must be >= 1, got {self.verify_workers}")
        require(self.mode in GATE_MODES, f"compile.mode must be one of {', '.join(GATE_MODES)}")
        require(self.mask_value < 0, f"compile.mask_value must be negative, got {self.mask_value}")
        require(self.rmsnorm in RMSNORM_FORMS, f"compile.rmsnorm must be one of {', '.join(RMSNORM_FORMS)}")
        check_gates(self.gates, "compile")
        for name, recipe in self.recipes.items():
            try:
                recipe.check()
            except AntinetError as exc:
                raise AntinetError(f"compile.recipes.{name}: {exc}") from None

    def gate(self, precision: str) -> GateConfig:
        return gate_for(self.gates, precision)

    def verify_windows(self, precision: str) -> int:
        """Held-out windows per text domain `precision` is verified on."""
        return self.recipes[precision].verify_samples or self.verify_samples

    def gate_mode(self, precision: str) -> str:
        return self.gate(precision).mode or self.mode


GENIE_RUNTIMES = ("auto", "libgenie", "appbuilder")


@dataclass
class GenieConfig:
    """Genie bundles (stage `genie`, one per `precisions` entry) and their check by Genie itself."""

    precisions: list[str] = field(default_factory=list, metadata=doc(
        "generation-part precisions bundled and checked by Genie (matrix; conf default: every entry of "
        "compile.generation.precisions)"))
    min_host_agreement: float = field(default=0.5, metadata=doc(
        "gate: share of Genie's greedy tokens equal to our host loop's over the same binaries (a miswired bundle "
        "generates garbage: near 0)"))
    min_fp32_agreement: dict[str, float] = field(default_factory=dict, metadata=doc(
        "gate per precision: share equal to the FP32 parts' greedy tokens; a precision not listed: recorded only "
        "(quantization's own loss)"))
    mode: str = field(default="fail", metadata=doc("fail | warn when under a gate"))
    use_mmap: bool = field(default=True, metadata=doc("the shipped config's QnnHtp use-mmap (AI Hub's default on a "
                                                       "device); the emulator check runs without"))
    n_threads: int = field(default=3, metadata=doc("the shipped config's engine n-threads"))
    graph_switching: bool = field(default=False, metadata=doc(
        "Genie's enable-graph-switching: one AR variant's graphs resident at a time (both configs)"))
    runtime: str = field(default="auto", metadata=doc(
        "how the genie backend runs a bundle: libgenie (Genie's C API, the onnxruntime-qnn wheel's or a device's "
        "libGenie), appbuilder (QAI AppBuilder's GenieContext, Windows on Snapdragon), auto (appbuilder where it is "
        "installed, else libgenie)"))

    def check(self) -> None:
        require(0 <= self.min_host_agreement <= 1, f"genie.min_host_agreement must be 0..1, got "
                                                   f"{self.min_host_agreement}")
        for precision, bound in self.min_fp32_agreement.items():
            require(0 <= bound <= 1, f"genie.min_fp32_agreement.{precision} must be 0..1, got {bound}")
        require(self.mode in GATE_MODES, f"genie.mode must be one of {', '.join(GATE_MODES)}")
        require(self.n_threads >= 1, f"genie.n_threads must be >= 1, got {self.n_threads}")
        require(self.runtime in GENIE_RUNTIMES, f"genie.runtime must be one of {', '.join(GENIE_RUNTIMES)}, got "
                                                f"{self.runtime!r}")
