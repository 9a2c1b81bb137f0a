"""Genie, Qualcomm's LLM runtime, on a bundle built by stage `genie` (`antinet_npu.runtime.genie`): generation only.

Genie samples for itself (the bundle's greedy sampler), so this backend offers timed generations, not logits: time to
first token is the first token's arrival, decode the gaps between later ones. On x86_64 it runs the bundle's emulator
config (the unshared binaries of the same graphs, on the HTP emulator): real tokens, timings that say nothing about
the NPU, labelled `emulated` and never ranked. On a device it runs the shipped weight-shared binaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.build import qnn
from antinet_npu.runtime import genie
from antinet_npu.runtime.backends.base import SINGLE_PASS, Backend

EMULATOR_CONFIG = "genie_config.emulator.json"


class GenieBackend(Backend):
    name = "genie"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        try:
            genie.library_path()
        except AntinetError as exc:  # AppBuilder brings its own Genie
            return None if genie.appbuilder_reason() is None else str(exc)
        return None

    def _runtime(self) -> str:
        """libgenie or appbuilder, as genie.runtime asks (auto: AppBuilder's GenieContext where it is installed)."""
        wanted = self.cfg.genie.runtime
        if wanted == "auto":
            return "appbuilder" if genie.appbuilder_reason() is None else "libgenie"
        if wanted == "appbuilder" and (reason := genie.appbuilder_reason()):
            raise AntinetError(f"genie.runtime=appbuilder: {reason}")
        return wanted

    dialog: genie.Dialog | None = None

    def load(self, artifact: Path, kind: str = SINGLE_PASS) -> None:
        bundle = genie.GenieBundle.read(artifact)
        gen = self.cfg.compile.generation
        if (bundle.prefill_len, bundle.context_length, bundle.parts) != (gen.prefill_len, gen.context_length,
                                                                          gen.parts):
            raise AntinetError(f"{artifact} was built for AR-{bundle.prefill_len}, context {bundle.context_length}, "
                               f"{bundle.parts} parts, not what compile.generation asks (AR-{gen.prefill_len}, "
                               f"context {gen.context_length}, {gen.parts} parts): re-run `dvc repro genie`")
        runtime = self._runtime()
        # AppBuilder loads its own QNN libraries beside it: only libGenie's are known here
        bundle.check_runtime(self.cfg.target.soc_model, genie.qnn_version() if runtime == "libgenie" else None)
        for f in (bundle.tokenizer, *bundle.binaries):  # a damaged bundle is an error wherever it would run
            f.check(artifact)
        if qnn.emulated():  # the emulator cannot load weight-shared binaries: the same graphs, unshared
            config = json.loads((artifact / EMULATOR_CONFIG).read_text())
            self.binaries = "unshared (compile-gen verify/)"
        else:
            config = json.loads((artifact / genie.CONFIG).read_text())
            self.binaries = "shared (bundle)"
        config = genie.resolve_paths(config, artifact)
        for path in config["dialog"]["engine"]["model"]["binary"]["ctx-bins"]:
            if not Path(path).is_file():
                raise AntinetError(f"{path} not found (named by {artifact}'s Genie config): re-run `dvc repro "
                                   f"compile-gen@{bundle.precision} genie@{bundle.precision}`")
        # a benchmark generates exactly the tokens it asks for (serve stops at the tokenizer's EOS itself); Genie
        # pads prompt chunks with the bundle's pad-token, never with this -1
        config["dialog"]["context"]["eos-token"] = -1
        self.bundle, self.context_length, self.runtime = bundle, bundle.context_length, runtime
        self.dialog = genie.Dialog(config) if runtime == "libgenie" else \
            genie.AppBuilderDialog(config, bundle.tokenizer.check(artifact))

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        raise AntinetError("genie generates (bench-gen, serve) and gives no logits: time single passes on qnn-htp")

    def stepper(self):
        raise AntinetError("genie samples for itself and gives no logits: use timed_generate")

    def timed_generate(self, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float, list[float], float]:
        """(tokens, time to first token ms, per-token decode ms, end-to-end ms) of one greedy generation."""
        import time

        start = time.perf_counter_ns()
        out = self.dialog.generate(np.asarray(prompt).reshape(-1).tolist(), new_tokens)
        e2e = (time.perf_counter_ns() - start) / 1e6
        if not out.tokens:
            raise AntinetError("Genie generated no token: see its log lines above")
        arrivals = np.asarray(out.arrival_ns, np.float64) / 1e6
        return out.tokens, float(arrivals[0]), np.diff(arrivals).tolist(), e2e

    def describe(self) -> dict:
        return {"backend": self.name, "device": qnn.device_name(), "emulated": qnn.emulated(),
                "genie_runtime": self.runtime,
                "genie_api_version": genie.api_version() if self.runtime == "libgenie" else None,
                "qnn_sdk_version": self.bundle.qnn_sdk_version,
                "prefill_len": self.bundle.prefill_len, "context_length": self.bundle.context_length,
                "num_parts": self.bundle.parts, "binaries": self.binaries}

    def close(self) -> None:
        if self.dialog is not None:
            self.dialog.close()
            self.dialog = None
