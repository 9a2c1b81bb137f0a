"""onnxruntime's CPU execution provider on the FP32 export and the `quantize` variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.build import onnx_models
from antinet_npu.runtime import generation
from antinet_npu.runtime.backends.base import SINGLE_PASS, Backend
from antinet_npu.signature import PADDING_MASK, Signature


class OrtCpuBackend(Backend):
    name = "ort-cpu"

    def load(self, artifact: Path, kind: str = SINGLE_PASS) -> None:
        if not artifact.is_file():
            raise AntinetError(f"{artifact} not found: run `dvc repro` (export / quantize) first")
        self.signature = Signature.read(artifact)
        self.session = onnx_models.cpu_session(artifact, self.cfg.bench.threads)

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        self.check_input(input_ids)
        if self.signature.mask != PADDING_MASK:  # a static NPU graph run on the CPU
            return self.session.run(["logits"], self.signature.static_feeds(input_ids))[0]
        return onnx_models.run_logits(self.session, self.signature, input_ids)

    def stepper(self) -> generation.Stepper:
        if self.signature.kv is None:
            return super().stepper()
        return generation.OrtKvStepper(self.session, self.signature)

    def describe(self) -> dict:
        return {"backend": self.name, "device": "cpu", "emulated": False, "threads": self.cfg.bench.threads}
