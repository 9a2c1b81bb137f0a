"""onnxruntime's QNN execution provider: HTP (the NPU; the x86_64 emulator here) and GPU (Adreno) backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.build import qnn
from antinet_npu.build.static_llm import StaticStepper, check_built_for, open_parts
from antinet_npu.config import HTP_PERF_MODES
from antinet_npu.runtime.backends.base import GENERATION, SINGLE_PASS, Backend
from antinet_npu.signature import Signature


class QnnHtpBackend(Backend):
    """A `compile` context model (`..._ctx.onnx` + `.bin`) on the HTP backend, or a `compile-gen` folder of
    generation parts (AR-N prefill and AR-1 decode per part), which generates through `static_llm.StaticStepper`."""

    name = "qnn-htp"
    qnn_backend = "htp"
    perf_modes = HTP_PERF_MODES

    require = staticmethod(qnn.require)

    parts: StaticStepper | None = None

    def load(self, artifact: Path, kind: str = SINGLE_PASS) -> None:
        self.check_perf_mode()
        if kind == GENERATION:
            return self._load_parts(artifact)
        if not artifact.is_file():
            raise AntinetError(f"{artifact} not found: run `dvc repro compile` first")
        self.signature = Signature.read(artifact)
        try:
            self.session = qnn.session(artifact, self.cfg.target, backend=self.qnn_backend,
                                       perf_mode=self.perf_mode, allow_cpu_fallback=False)
        except AntinetError as exc:
            raise AntinetError(f"{exc}: if {artifact.name} or its context binary is damaged, delete them and re-run "
                               "`dvc repro compile`") from None

    def _load_parts(self, folder: Path) -> None:
        """The shared binaries on a device; on the x86_64 emulator, which cannot load them, the unshared ones the
        stage verified (`verify/`). Which graph is which comes from the wrappers' signatures."""
        self.binaries = "unshared (verify/)" if qnn.emulated() else "shared"
        where = folder / "verify" if qnn.emulated() else folder
        wrappers = sorted(where.glob("*_ctx.onnx"))
        if not wrappers:
            raise AntinetError(f"{where} holds no context wrappers: run `dvc repro compile-gen` first")
        graphs: dict[int, dict[int, Path]] = {}
        gen = self.cfg.compile.generation
        for path in wrappers:
            signature = Signature.read(path)
            check_built_for(path, signature, gen.prefill_len, gen.context_length, gen.parts, "compile-gen")
            graphs.setdefault(signature.seq_len, {})[signature.part.index] = path
        if len(graphs) != 2 or 1 not in graphs:
            raise AntinetError(f"{where} must hold an AR-N and an AR-1 graph per part, found AR "
                               f"{sorted(graphs)}: re-run `dvc repro compile-gen`")
        share = None if qnn.emulated() else "continue"  # a device loads one context for both graphs of a part

        def open_graph(path: Path):
            try:
                session = qnn.session(path, self.cfg.target, backend=self.qnn_backend, perf_mode=self.perf_mode,
                                      allow_cpu_fallback=False, share=share)
            except AntinetError as exc:
                raise AntinetError(f"{exc}: if {path.name} or its context binary is damaged, delete them and re-run "
                                   "`dvc repro compile-gen`") from None
            return session

        for ar in graphs:
            if sorted(graphs[ar]) != list(range(gen.parts)):
                raise AntinetError(f"{where}: the AR-{ar} graphs cover parts {sorted(graphs[ar])} of {gen.parts}: "
                                   "re-run `dvc repro compile-gen`")
        self.parts = open_parts({ar: [graphs[ar][i] for i in range(gen.parts)] for ar in graphs}, open_graph)

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        if self.parts is not None:  # one pass = a prefill in AR-N chunks
            return self.parts.score(input_ids.reshape(-1))[None]
        self.check_input(input_ids)
        return self.session.run(None, self.signature.static_feeds(input_ids))[0]

    def stepper(self):
        if self.parts is None:
            return super().stepper()
        return self.parts

    def describe(self) -> dict:
        described = {"backend": self.name, "device": qnn.device_name(self.qnn_backend), "emulated": qnn.emulated(),
                     "perf_mode": self.perf_mode, "soc_model": self.cfg.target.soc_model}
        if self.parts is not None:
            described.update(prefill_len=self.parts.prefill_len, context_length=self.parts.context_length,
                             num_parts=len(self.parts.parts), binaries=self.binaries)
        return described


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
