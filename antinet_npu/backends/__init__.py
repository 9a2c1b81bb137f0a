"""Runtime backends: one small interface, one registry, and the fallback chain.

A backend loads one artifact, runs (1, S) token ids to logits, hands out a generation `Stepper` when its artifact has
a KV cache, and describes what actually ran. Adding a backend is one new module here and one line in `registry`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.config import Config
from antinet_npu.signature import Signature

log = logging.getLogger(__name__)


class Backend(ABC):
    name: ClassVar[str]
    #: perf modes this runtime understands (empty: it has none, e.g. the CPU)
    perf_modes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config, perf_mode: str):
        self.cfg = cfg
        self.perf_mode = perf_mode
        self.signature: Signature | None = None  # what the loaded artifact takes and gives

    @property
    def seq_len(self) -> int | None:
        """Tokens per call, fixed for static-shape artifacts."""
        return self.signature.seq_len if self.signature else None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine, or None when it can."""
        return None

    def check_perf_mode(self) -> None:
        if self.perf_modes and self.perf_mode not in self.perf_modes:
            raise AntinetError(f"{self.name} has no perf mode {self.perf_mode!r}: choose one of "
                               f"{', '.join(self.perf_modes)}")

    @abstractmethod
    def load(self, artifact: Path) -> None:
        """Load the model (and warm nothing): raises AntinetError when the artifact is missing or unusable."""

    @abstractmethod
    def run(self, input_ids: np.ndarray) -> np.ndarray:
        """(1, S) int64 token ids -> (1, S, vocab) float32 logits."""

    @abstractmethod
    def describe(self) -> dict:
        """What ran: backend, device, emulated (and anything else worth recording)."""

    def stepper(self):
        """A generation session over the loaded artifact's KV cache (`generation.Stepper`)."""
        shape = f"a static single-pass graph of {self.seq_len} tokens" if self.seq_len else "single passes only"
        raise AntinetError(f"{self.name} runs {shape} and cannot generate: generate on the NPU from the compile-gen "
                           "parts (bench.generation.runs qnn-htp-<precision>), or on ort-cpu or torch")

    def check_input(self, input_ids: np.ndarray) -> None:
        if self.seq_len is not None and input_ids.shape[-1] != self.seq_len:
            raise AntinetError(f"{self.name} runs a static graph of exactly {self.seq_len} tokens, got "
                               f"{input_ids.shape[-1]}: pad or cut the input, or compile that length")

    def close(self) -> None:
        """Release the runtime (sessions, perf votes)."""


def registry() -> dict[str, type[Backend]]:
    from antinet_npu.backends.appbuilder import AppBuilderBackend
    from antinet_npu.backends.genie import GenieBackend
    from antinet_npu.backends.ort_cpu import OrtCpuBackend
    from antinet_npu.backends.ort_genai import OrtGenaiBackend
    from antinet_npu.backends.qnn_ep import QnnGpuBackend, QnnHtpBackend
    from antinet_npu.backends.torch_eager import TorchBackend

    return {b.name: b for b in (TorchBackend, OrtCpuBackend, QnnHtpBackend, QnnGpuBackend, AppBuilderBackend,
                                OrtGenaiBackend, GenieBackend)}


NPU_BACKENDS = ("qai-appbuilder", "qnn-htp")


def open_with_fallback(cfg: Config, key: str) -> tuple[Backend, dict]:
    """Load run `key` on its backend, or on the next one of `bench.fallback` that is available.

    Returns the loaded backend and what happened: requested_backend, backend, precision_run, artifact,
    fallback_reason (None when the requested backend ran). A missing or damaged artifact is not a runtime failure:
    it fails at once, naming the stage to run.
    """
    from antinet_npu import artifacts

    run = cfg.bench.runs[key]
    chain = [run.backend]
    if run.backend in cfg.bench.fallback:
        chain += cfg.bench.fallback[cfg.bench.fallback.index(run.backend) + 1:]
    reasons: list[str] = []
    backends = registry()
    # A perf mode the requested runtime lacks is a config error, not a reason to fall back.
    backends[run.backend](cfg, cfg.bench.perf_mode).check_perf_mode()
    for name in chain:
        if name == run.backend or (name in NPU_BACKENDS and run.backend in NPU_BACKENDS):
            artifact, precision = artifacts.MODELS / run.model, run.precision
        elif name == "ort-cpu":
            precision = cfg.bench.fallback_cpu_precision
            artifact, _ = artifacts.run_artifact(cfg.model.name, name, precision)
        else:
            reasons.append(f"{name}: cannot stand in for {run.backend}")
            continue
        if not artifact.exists():
            raise AntinetError(f"{artifact} not found for bench run {key} on {name}: run `dvc repro` "
                               f"(the stage that builds {precision}) first")
        cls = backends[name]
        reason = cls.unavailable_reason()
        if reason is None:
            # The runtime is here: a load failure is a damaged or incompatible artifact, which no other backend's
            # numbers may hide. Fallback is for a runtime that is not available.
            backend = cls(cfg, cfg.bench.perf_mode)
            backend.load(artifact)
            return backend, {"requested_backend": run.backend, "backend": name, "precision_run": precision,
                             "artifact": str(artifact), "fallback_reason": "; ".join(reasons) or None}
        log.warning("%s unavailable for %s: %s%s", name, key, reason,
                    "; falling back" if name != chain[-1] else "")
        reasons.append(f"{name}: {reason}")
    raise AntinetError(f"no backend could run {key}: " + "; ".join(reasons))
