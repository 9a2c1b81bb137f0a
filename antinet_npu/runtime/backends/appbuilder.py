"""QAI AppBuilder (qai_appbuilder) on a `compile` context binary or the `compile-gen` parts: Windows on Snapdragon only.

Written against AppBuilder's documented Python API (QNNConfig.Config, QNNContext, Inference, PerfProfile); the seed
document's `qai.load_model` / `model.infer` do not exist. Tested here against that API contract only: it has not
run on Snapdragon hardware in this project's CI (there is none), and says so in its metrics (`verified_on_device`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.build.static_llm import StaticStepper
from antinet_npu.runtime.backends.base import GENERATION, SINGLE_PASS, Backend
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

    parts: StaticStepper | None = None

    def load(self, artifact: Path, kind: str = SINGLE_PASS) -> None:
        """`artifact` is a `compile` context model (AppBuilder loads the `.bin` beside it), or a `compile-gen` folder
        (one `.bin` per part holding its AR-N and AR-1 graphs, run with `Inference(..., graphIndex=k)`)."""
        global _configured
        from qai_appbuilder import DataType, LogLevel, PerfProfile, ProfilingLevel, QNNConfig, Runtime

        self.check_perf_mode()
        if kind == SINGLE_PASS:
            binary = artifact.with_name(artifact.stem + "_qnn.bin") if artifact.suffix == ".onnx" else artifact
            if not binary.is_file():
                raise AntinetError(f"{binary} not found: run `dvc repro compile` (or copy the .bin next to its "
                                   "_ctx.onnx)")
        if not _configured:  # once per process, before any context
            QNNConfig.Config(self.cfg.bench.appbuilder_lib_path, Runtime.HTP, LogLevel.WARN, ProfilingLevel.BASIC)
            _configured = True
        if kind == GENERATION:
            self._load_parts(artifact, DataType.FLOAT)
        else:
            from qai_appbuilder import QNNContext

            self.signature = Signature.read(artifact)  # written by `compile` beside the _ctx.onnx
            self.context = QNNContext(binary.stem, str(binary), input_data_type=DataType.FLOAT,
                                      output_data_type=DataType.FLOAT)
        self._profiles = PerfProfile
        PerfProfile.SetPerfProfileGlobal(getattr(PerfProfile, PROFILES[self.perf_mode]))

    def _load_parts(self, folder: Path, float_type) -> None:
        """One QNNContext per part over its shared `.bin`; each wrapper's signature says which part and graph
        index it is, and the shapes of the flat buffers AppBuilder returns."""
        from qai_appbuilder import QNNContext

        from antinet_npu.build.qnn import context_binaries

        graphs: dict[int, dict[int, Signature]] = {}
        binaries: dict[int, Path] = {}
        for wrapper in sorted(folder.glob("*_ctx.onnx")):
            signature = Signature.read(wrapper)
            if signature.part is None or signature.context_graph is None:
                raise AntinetError(f"{wrapper} is not a compile-gen part: re-run `dvc repro compile-gen`")
            graphs.setdefault(signature.seq_len, {})[signature.part.index] = signature
            found = context_binaries(wrapper)
            if len(found) != 1 or not found[0].is_file():
                raise AntinetError(f"the context binary of {wrapper.name} is missing: run `dvc repro compile-gen` (or "
                                   "copy the .bin beside it)")
            binaries[signature.part.index] = found[0]
        if len(graphs) != 2 or 1 not in graphs:
            raise AntinetError(f"{folder} must hold an AR-N and an AR-1 wrapper per part: re-run `dvc repro "
                               "compile-gen`")
        contexts = {i: QNNContext(b.stem, str(b), input_data_type=float_type, output_data_type=float_type)
                    for i, b in sorted(binaries.items())}

        def runner(signature: Signature):
            context, ar, kv = contexts[signature.part.index], signature.seq_len, signature.kv

            def run(feeds):
                flat = context.Inference([np.asarray(feeds[n], np.float32) for n in signature.inputs],
                                         graphIndex=signature.context_graph)
                kinds = [name.split("_")[1] for name in signature.outputs[1:]]  # past_key_3_out -> key
                return [np.asarray(flat[0], np.float32).reshape(1, ar, -1),
                        *(np.asarray(x, np.float32).reshape(kv.part_shape(kind, ar))
                          for x, kind in zip(flat[1:], kinds))]
            return run

        prefill_len = max(graphs)
        count = len(binaries)
        self.parts = StaticStepper([graphs[prefill_len][i] for i in range(count)],
                                   [runner(graphs[prefill_len][i]) for i in range(count)],
                                   [runner(graphs[1][i]) for i in range(count)])

    def stepper(self):
        return self.parts if self.parts is not None else super().stepper()

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        if self.parts is not None:
            return self.parts.score(input_ids.reshape(-1))[None]
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
