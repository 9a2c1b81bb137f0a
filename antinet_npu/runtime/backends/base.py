"""The interface every runtime backend implements (`registry` lists them)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.signature import Signature

if TYPE_CHECKING:
    from antinet_npu.config import Config

SINGLE_PASS, GENERATION = "single-pass", "generation"  # what a run asks of its backend: the graph kind it loads


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

    @staticmethod
    def require() -> object:
        """Import the runtime this backend needs beyond the core (AntinetError naming the extra when missing)."""
        return None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run on this machine, or None when it can."""
        try:
            cls.require()
        except AntinetError as exc:
            return str(exc)
        return None

    def check_perf_mode(self) -> None:
        if self.perf_modes and self.perf_mode not in self.perf_modes:
            raise AntinetError(f"{self.name} has no perf mode {self.perf_mode!r}: choose one of "
                               f"{', '.join(self.perf_modes)}")

    @abstractmethod
    def load(self, artifact: Path, kind: str = SINGLE_PASS) -> None:
        """Load the model for `kind` of run (`registry.SINGLE_PASS` or `GENERATION`: which graph kind the artifact
        holds, from the backend's spec, never guessed from the path), warming nothing: raises AntinetError when the
        artifact is missing or unusable."""

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
