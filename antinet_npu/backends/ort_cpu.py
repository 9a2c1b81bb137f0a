"""onnxruntime's CPU execution provider on the FP32 export and the `quantize` variants."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from antinet_npu import AntinetError, onnx_models
from antinet_npu.backends import Backend


class OrtCpuBackend(Backend):
    name = "ort-cpu"

    def load(self, artifact: Path) -> None:
        if not artifact.is_file():
            raise AntinetError(f"{artifact} not found: run `dvc repro` (export / quantize) first")
        self.session = onnx_models.cpu_session(artifact, self.cfg.bench.threads)
        self.seq_len = onnx_models.static_seq_len(self.session)

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        self.check_input(input_ids)
        return onnx_models.run_logits(self.session, input_ids)

    def describe(self) -> dict:
        return {"backend": self.name, "device": "cpu", "emulated": False, "threads": self.cfg.bench.threads}
