"""onnxruntime's QNN execution provider: HTP (the NPU; the x86_64 emulator here) and GPU (Adreno) backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from antinet_npu import AntinetError, qnn
from antinet_npu.backends import Backend
from antinet_npu.config import HTP_PERF_MODES
from antinet_npu.signature import Signature


class QnnHtpBackend(Backend):
    """A `compile` context model (`..._ctx.onnx` + `.bin`) on the HTP backend."""

    name = "qnn-htp"
    qnn_backend = "htp"
    perf_modes = HTP_PERF_MODES

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            qnn.require()
        except AntinetError as exc:
            return str(exc)
        return None

    def load(self, artifact: Path) -> None:
        self.check_perf_mode()
        if not artifact.is_file():
            raise AntinetError(f"{artifact} not found: run `dvc repro compile` first")
        self.signature = Signature.read(artifact)
        try:
            self.session = qnn.session(artifact, self.cfg.target, backend=self.qnn_backend,
                                       perf_mode=self.perf_mode, allow_cpu_fallback=False)
        except AntinetError as exc:
            raise AntinetError(f"{exc}: if {artifact.name} or its context binary is damaged, delete them and re-run "
                               "`dvc repro compile`") from None

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        self.check_input(input_ids)
        return self.session.run(None, self.signature.static_feeds(input_ids))[0]

    def describe(self) -> dict:
        return {"backend": self.name, "device": qnn.device_name(self.qnn_backend), "emulated": qnn.emulated(),
                "perf_mode": self.perf_mode, "soc_model": self.cfg.target.soc_model}


class QnnGpuBackend(QnnHtpBackend):
    """A static float graph (`export-npu`) on the Adreno GPU through the QNN GPU backend: only on a device."""

    name = "qnn-gpu"
    qnn_backend = "gpu"
    perf_modes = ()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if qnn.emulated():
            return "the QNN GPU backend needs an Adreno GPU (a Snapdragon device); this machine is x86_64"
        return super().unavailable_reason()

    def describe(self) -> dict:
        return {"backend": self.name, "device": qnn.device_name("gpu"), "emulated": False}
