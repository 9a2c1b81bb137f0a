"""Every backend by name with what it can do (`BackendSpec`), and `open_run`: the one way bench, bench-gen and serve
open a run. Adding a backend: its module, its config, and one line in `SPECS`."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from antinet_npu import AntinetError
from antinet_npu.runtime.backends.base import GENERATION, SINGLE_PASS, Backend

if TYPE_CHECKING:  # config imports this table to validate run lists
    from antinet_npu.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSpec:
    """What a backend is, without importing it (onnxruntime, torch, libGenie load only when a run opens)."""

    name: str
    impl: str                 # "module:Class", imported by `cls`
    unit: str                 # CPU | NPU | GPU: what reporting ranks it against
    single_pass: str | None   # what it loads for single passes (bench.runs): an `artifacts.run_artifact` kind
    generation: str | None    # what it loads to generate (bench.generation.runs, serve); None: it cannot
    same_artifacts_as: str | None = None  # a backend whose artifacts it runs: may stand in for it (bench.fallback)

    def artifact(self, kind: str) -> str | None:
        return self.single_pass if kind == SINGLE_PASS else self.generation

    def cls(self) -> type[Backend]:
        module, _, name = self.impl.partition(":")
        return getattr(importlib.import_module(module), name)


SPECS = {s.name: s for s in (
    BackendSpec("torch", "antinet_npu.runtime.backends.torch_eager:TorchBackend", "CPU", "pytorch", "pytorch"),
    BackendSpec("ort-cpu", "antinet_npu.runtime.backends.ort_cpu:OrtCpuBackend", "CPU", "onnx", "onnx"),
    BackendSpec("qnn-htp", "antinet_npu.runtime.backends.qnn_ep:QnnHtpBackend", "NPU", "qnn-context", "qnn-parts"),
    BackendSpec("qnn-gpu", "antinet_npu.runtime.backends.qnn_ep:QnnGpuBackend", "GPU", "npu-onnx", None),
    BackendSpec("qai-appbuilder", "antinet_npu.runtime.backends.appbuilder:AppBuilderBackend", "NPU", "qnn-context",
                "qnn-parts", same_artifacts_as="qnn-htp"),
    BackendSpec("ort-genai", "antinet_npu.runtime.backends.ort_genai:OrtGenaiBackend", "CPU", None, "genai"),
    BackendSpec("llama-cpp", "antinet_npu.runtime.backends.llama_cpp:LlamaCppBackend", "CPU", None, "gguf"),
    BackendSpec("genie", "antinet_npu.runtime.backends.genie:GenieBackend", "NPU", None, "genie"),
)}


def spec(name: str) -> BackendSpec:
    if name not in SPECS:
        raise AntinetError(f"unknown backend {name!r}: choose one of {', '.join(SPECS)}")
    return SPECS[name]


def registry() -> dict[str, type[Backend]]:
    """Every backend class by name (imports them all)."""
    return {name: s.cls() for name, s in SPECS.items()}


def interchangeable(a: str, b: str) -> bool:
    """Whether backend `a` runs the artifacts built for `b` (and so may stand in for it)."""
    root = {n: SPECS[n].same_artifacts_as or n for n in (a, b)}
    return root[a] == root[b]


def open_run(cfg: Config, key: str) -> tuple[Backend, dict]:
    """Load run `key` of bench.runs (a single pass; `bench.fallback` applies) or of bench.generation.runs (a
    generation, on the backend named only: a generation figure means nothing for another one).

    Returns the loaded backend and what happened: requested_backend, backend, precision_run, artifact,
    fallback_reason (None when the requested backend ran). A missing or damaged artifact is not a runtime failure:
    it fails at once, naming the stage to run.
    """
    from antinet_npu import artifacts

    if key in cfg.bench.runs:
        run, kind = cfg.bench.runs[key], SINGLE_PASS
        chain = [run.backend]
        if run.backend in cfg.bench.fallback:
            chain += cfg.bench.fallback[cfg.bench.fallback.index(run.backend) + 1:]
    elif key in cfg.bench.generation.runs:
        run, kind = cfg.bench.generation.runs[key], GENERATION
        chain = [run.backend]
    else:
        raise AntinetError(f"no run {key!r} in bench.runs or bench.generation.runs: choose one of "
                           f"{', '.join([*cfg.bench.runs, *cfg.bench.generation.runs])}")
    reasons: list[str] = []
    if spec(run.backend).artifact(kind) is None:
        raise AntinetError(f"{key}: {run.backend} cannot run {kind}s")
    # A perf mode the requested runtime lacks is a config error, not a reason to fall back.
    spec(run.backend).cls()(cfg, cfg.bench.perf_mode).check_perf_mode()
    for name in chain:
        if interchangeable(name, run.backend):
            artifact, precision = artifacts.MODELS / run.model, run.precision
        elif kind == SINGLE_PASS and spec(name).single_pass:  # another unit's own build of the model
            precision = cfg.bench.fallback_cpu_precision
            artifact = artifacts.run_artifact(cfg.model.name, spec(name).single_pass, precision, run.seq_len)[0]
        else:
            reasons.append(f"{name}: cannot stand in for {run.backend}")
            continue
        if not artifact.exists():
            raise AntinetError(f"{artifact} not found for run {key} on {name}: run `dvc repro` (the stage that "
                               f"builds {precision}) first")
        cls = spec(name).cls()
        reason = cls.unavailable_reason()
        if reason is None:
            # The runtime is here: a load failure is a damaged or incompatible artifact, which no other backend's
            # numbers may hide. Fallback is for a runtime that is not available.
            backend = cls(cfg, cfg.bench.perf_mode)
            backend.load(artifact, kind)
            return backend, {"requested_backend": run.backend, "backend": name, "precision_run": precision,
                             "artifact": str(artifact), "fallback_reason": "; ".join(reasons) or None}
        if kind == GENERATION:
            raise AntinetError(f"{key}: {reason}")
        log.warning("%s unavailable for %s: %s%s", name, key, reason, "; falling back" if name != chain[-1] else "")
        reasons.append(f"{name}: {reason}")
    raise AntinetError(f"no backend could run {key}: " + "; ".join(reasons))

