"""What is measured and served: `bench` runs (single pass and generation) and `serve`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from antinet_npu.config.npu import HTP_PERF_MODES
from antinet_npu.config.schema import doc, require
from antinet_npu.runtime.backends.registry import SPECS

BACKENDS = tuple(SPECS)
SINGLE_PASS_BACKENDS = tuple(n for n, s in SPECS.items() if s.single_pass)
GENERATION_BACKENDS = tuple(n for n, s in SPECS.items() if s.generation)
GENAI_PRECISIONS = ("int4", "int8", "fp16", "fp32")
GGUF_TYPES = ("q4_0", "q8_0", "f16")  # what llama.cpp's quantizer is asked for (export-gguf)


@dataclass
class BenchRunConfig:
    """One benchmark: a backend running one artifact at one sequence length (key: <backend>-<precision>-<S>)."""

    backend: str = field(default=MISSING, metadata=doc(", ".join(SINGLE_PASS_BACKENDS)))
    precision: str = field(default=MISSING, metadata=doc("fp32, a quantize precision, or an NPU precision"))
    seq_len: int = field(default=MISSING)
    model: str = field(default=MISSING, metadata=doc("artifact under models/ that the backend loads"))
    weights: str = field(default=MISSING, metadata=doc("its weights under models/ (so DVC sees changes)"))


@dataclass
class GenRunConfig:
    """One generation benchmark: a backend generating from one artifact (key: <backend>-<precision>[-nocache])."""

    backend: str = field(default=MISSING, metadata=doc(" | ".join(GENERATION_BACKENDS)))
    precision: str = field(default=MISSING)
    model: str = field(default=MISSING, metadata=doc("artifact under models/ that the backend loads"))
    weights: str = field(default=MISSING, metadata=doc("its weights under models/ (so DVC sees changes)"))
    cache: bool = field(default=True, metadata=doc("false: no KV cache, the whole prefix re-run for every new "
                                                     "token (the baseline a single-pass graph allows)"))
    new_tokens: Optional[int] = field(default=None, metadata=doc("tokens per prompt for this run (null: "
                                                                   "bench.generation.new_tokens)"))


@dataclass
class GenerationBenchConfig:
    """Prefill + decode: time to first token and decode tokens/s, per run and prompt length."""

    runs: dict[str, GenRunConfig] = field(default_factory=dict, metadata=doc("the bench-gen matrix"))
    prompt_lens: list[int] = field(default_factory=lambda: [32, 128], metadata=doc("prompt tokens P"))
    new_tokens: int = field(default=64, metadata=doc("tokens generated per prompt G (greedy, EOS ignored)"))
    warmup: int = field(default=1, metadata=doc("untimed generations per prompt length"))
    iterations: int = field(default=3, metadata=doc("timed generations per prompt length"))
    genai_precisions: list[str] = field(default_factory=lambda: ["int4", "int8", "fp32"],
                                        metadata=doc("onnxruntime-genai models built (export-genai) for the peer"))
    gguf_types: list[str] = field(default_factory=list,
                                  metadata=doc("llama.cpp models built (export-gguf) for the other peer: " +
                                               ", ".join(GGUF_TYPES) + " (needs the llamacpp extra)"))

    def check(self) -> None:
        require(bool(self.prompt_lens) and all(p > 0 for p in self.prompt_lens) and self.new_tokens > 1,
                 f"bench.generation.prompt_lens must be positive and new_tokens > 1, got {self.prompt_lens} and "
                 f"{self.new_tokens}")
        require(self.warmup >= 0 and self.iterations > 0,
                 f"bench.generation.warmup must be >= 0 and iterations > 0, got {self.warmup} and {self.iterations}")
        for p in self.genai_precisions:
            require(p in GENAI_PRECISIONS, f"bench.generation.genai_precisions: {p!r} is not one of "
                     f"{', '.join(GENAI_PRECISIONS)}")
        for t in self.gguf_types:
            require(t in GGUF_TYPES, f"bench.generation.gguf_types: {t!r} is not one of {', '.join(GGUF_TYPES)}")
        for key, run in self.runs.items():
            require(run.backend in GENERATION_BACKENDS,
                     f"bench.generation.runs.{key}: backend {run.backend!r} cannot generate: use one of "
                     f"{', '.join(GENERATION_BACKENDS)} (qnn-htp: the compile-gen parts; genie: the Genie bundle)")
            require(run.new_tokens is None or run.new_tokens > 1,
                     f"bench.generation.runs.{key}.new_tokens must be > 1 or null, got {run.new_tokens}")
            expected = f"{run.backend}-{run.precision}" + ("" if run.cache else "-nocache")
            require(key == expected, f"bench.generation.runs.{key} must be named {expected}")


@dataclass
class BenchConfig:
    runs: dict[str, BenchRunConfig] = field(default_factory=dict, metadata=doc("the bench matrix"))
    generation: GenerationBenchConfig = field(default_factory=GenerationBenchConfig)
    warmup: int = field(default=3, metadata=doc("untimed runs after loading (the seed warms up 3 times)"))
    iterations: int = field(default=10, metadata=doc("timed runs"))
    threads: int = field(default=0, metadata=doc("CPU intra-op threads for torch / ort-cpu (0: all cores)"))
    perf_mode: str = field(default="burst", metadata=doc("NPU performance mode: " + ", ".join(HTP_PERF_MODES)))
    budget_ms: float = field(default=500.0, metadata=doc("latency budget per forward pass (the seed's 500 ms)"))
    fallback: list[str] = field(default_factory=list,
                                metadata=doc("backends tried in order when one is unavailable or fails"))
    fallback_cpu_precision: str = field(default="int8-block",
                                        metadata=doc("what ort-cpu runs when it stands in for an NPU backend"))
    appbuilder_lib_path: str = field(default="None", metadata=doc("QNN libraries for AppBuilder ('None': its own)"))

    def check(self) -> None:
        require(self.warmup >= 0 and self.iterations > 0, f"bench.warmup must be >= 0 and bench.iterations > 0, "
                 f"got {self.warmup} and {self.iterations}")
        require(self.budget_ms > 0, f"bench.budget_ms must be positive, got {self.budget_ms}")
        require(self.perf_mode in HTP_PERF_MODES, f"unknown bench.perf_mode {self.perf_mode!r}: choose one of "
                 f"{', '.join(HTP_PERF_MODES)}")
        for name in self.fallback:
            require(name in BACKENDS, f"unknown backend {name!r} in bench.fallback: choose from {', '.join(BACKENDS)}")
        self.generation.check()
        for key, run in self.runs.items():
            require(run.backend in SINGLE_PASS_BACKENDS, f"bench.runs.{key}: unknown backend {run.backend!r} for "
                     f"single passes: choose one of {', '.join(SINGLE_PASS_BACKENDS)}")
            require(key == f"{run.backend}-{run.precision}-{run.seq_len}",
                     f"bench.runs.{key} must be named {run.backend}-{run.precision}-{run.seq_len}")


@dataclass
class ServeConfig:
    run: str = field(default="ort-cpu-int8-block-128",
                     metadata=doc("a key of bench.runs (fallback chain applies) or of bench.generation.runs (e.g. "
                                  "genie-w8a16): the artifact and backend to serve"))
    host: str = "127.0.0.1"
    port: int = 8000
    warmup: int = field(default=3, metadata=doc("forward passes after loading, before the model is ready"))
    max_new_tokens: int = field(default=64, metadata=doc("upper bound a request may ask for"))
    max_queue: int = field(default=64, metadata=doc("requests waiting for the model at most; more get 429"))
    request_timeout_s: float = field(default=300.0, metadata=doc("a request's deadline, queueing included"))
    max_body_kb: int = field(default=1024, metadata=doc("request bodies larger than this get 413, unread"))
    max_stop: int = field(default=16, metadata=doc("stop sequences per request at most (each <= 256 characters)"))
    prefix_cache_mb: float = field(default=256.0, metadata=doc("KV state of recent prompts kept (LRU); 0: off"))
    drain_s: float = field(default=10.0, metadata=doc("on SIGTERM: time given to requests in flight, then "
                                                      "they are cancelled"))
    bench_every_s: float = field(default=0.0, metadata=doc("idle-time benchmark period (/metrics); 0: never"))

    def check(self) -> None:
        require(0 < self.port < 65536, f"serve.port must be 1..65535, got {self.port}")
        require(self.warmup >= 0 and self.max_new_tokens >= 0, "serve.warmup and serve.max_new_tokens must be "
                 f">= 0, got {self.warmup} and {self.max_new_tokens}")
        for key in ("max_queue", "request_timeout_s", "max_body_kb", "max_stop", "drain_s"):
            require(getattr(self, key) > 0, f"serve.{key} must be > 0, got {getattr(self, key)}")
        require(self.prefix_cache_mb >= 0 and self.bench_every_s >= 0,
                 f"serve.prefix_cache_mb and serve.bench_every_s must be >= 0, got {self.prefix_cache_mb} and "
                 f"{self.bench_every_s}")
