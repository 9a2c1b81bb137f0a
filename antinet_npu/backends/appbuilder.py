"""QAI AppBuilder (qai_appbuilder) on a `compile` context binary: Windows on Snapdragon only.

Written against AppBuilder's documented Python API (QNNConfig.Config, QNNContext, Inference, PerfProfile); the seed
document's `qai.load_model` / `model.infer` do not exist. Tested here against that API contract only: it has not
run on Snapdragon hardware in this project's CI (there is none), and says so in its metrics (`verified_on_device`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.backends import Backend
from antinet_npu.signature import Signature

# Our perf mode names -> AppBuilder PerfProfile attributes (AppBuilder has only these three).
PROFILES = {"default": "DEFAULT", "high_performance": "HIGH_PERFORMANCE", "burst": "BURST"}
_configured = False


class AppBuilderBackend(Backend):
    name = "qai-appbuilder"
    perf_modes = tuple(PROFILES)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if sys.platform != "win32":
            return f"qai-appbuilder runs only on Windows on Snapdragon (this is {sys.platform})"
        try:
            import qai_appbuilder  # noqa: F401
        except ImportError:
            return "qai_appbuilder is not installed: pip install 'antinet-npu[appbuilder]' (Windows only)"
        return None

    def load(self, artifact: Path) -> None:
        """`artifact` is a `compile` context model; AppBuilder loads the `.bin` beside it."""
        global _configured
        from qai_appbuilder import DataType, LogLevel, PerfProfile, ProfilingLevel, QNNConfig, QNNContext, Runtime

        self.check_perf_mode()
        binary = artifact.with_name(artifact.stem + "_qnn.bin") if artifact.suffix == ".onnx" else artifact
        if not binary.is_file():
            raise AntinetError(f"{binary} not found: run `dvc repro compile` (or copy the .bin next to its _ctx.onnx)")
        if not _configured:  # once per process, before any context
            QNNConfig.Config(self.cfg.bench.appbuilder_lib_path, Runtime.HTP, LogLevel.WARN, ProfilingLevel.BASIC)
            _configured = True
        self.signature = Signature.read(artifact)  # written by `compile` beside the _ctx.onnx
        self.context = QNNContext(binary.stem, str(binary), input_data_type=DataType.FLOAT,
                                  output_data_type=DataType.FLOAT)
        self._profiles = PerfProfile
        PerfProfile.SetPerfProfileGlobal(getattr(PerfProfile, PROFILES[self.perf_mode]))

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        self.check_input(input_ids)
        feeds = self.signature.static_feeds(input_ids)
        # FLOAT mode: AppBuilder converts float32 inputs to the graph's native types, in graph-input order.
        outputs = self.context.Inference([feeds[name].astype(np.float32) for name in self.signature.inputs])
        return np.asarray(outputs[0], dtype=np.float32).reshape(1, self.seq_len, -1)

    def describe(self) -> dict:
        return {"backend": self.name, "device": "hexagon-npu", "emulated": False, "perf_mode": self.perf_mode,
                "verified_on_device": False}

    def close(self) -> None:
        if getattr(self, "_profiles", None) is not None:
            self._profiles.RelPerfProfileGlobal()
            self._profiles = None
