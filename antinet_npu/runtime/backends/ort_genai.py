"""onnxruntime-genai (the peer): a model built by its own model builder, generated through its `og.Generator`.

It picks no tokens for us here: `append_tokens` + `get_logits` per step, so the same loop and the same clock as our
backends measure it. It has its own KV-cache buffers (shared past/present, allocated for the whole context).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.runtime.backends.base import SINGLE_PASS, Backend
from antinet_npu.runtime.generation import Snapshot

EXTRA = "pip install 'antinet-npu[genai]' (onnxruntime-genai)"


def require():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise AntinetError(f"onnxruntime-genai is not installed: {EXTRA}") from None
    return og


class OrtGenaiBackend(Backend):
    name = "ort-genai"

    require = staticmethod(require)

    def load(self, artifact: Path, kind: str = SINGLE_PASS) -> None:
        og = require()
        if not (artifact / "genai_config.json").is_file():
            raise AntinetError(f"{artifact} is not an onnxruntime-genai model (no genai_config.json): run "
                               "`dvc repro export-genai` first")
        config = og.Config(str(artifact))
        if self.cfg.bench.threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": self.cfg.bench.threads}}}}))
        try:
            self.model = og.Model(config)
        except Exception as exc:  # onnxruntime-genai raises RuntimeError with the ORT message
            raise AntinetError(f"onnxruntime-genai cannot load {artifact} ({str(exc).splitlines()[0][:200]}): "
                               "delete it and re-run `dvc repro export-genai`") from None
        self.context_length = json.loads((artifact / "genai_config.json").read_text())["model"]["context_length"]

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        raise AntinetError("ort-genai is benchmarked on generation only (bench-gen), not on single passes")

    def stepper(self) -> GenaiStepper:
        return GenaiStepper(self.model, self.context_length)

    def describe(self) -> dict:
        import onnxruntime_genai as og

        return {"backend": self.name, "device": "cpu", "emulated": False, "threads": self.cfg.bench.threads,
                "onnxruntime_genai": getattr(og, "__version__", "unknown")}


class GenaiStepper:
    def __init__(self, model, context_length: int):
        self.model, self.context_length = model, context_length
        self.generator = None

    @property
    def length(self) -> int:
        return 0 if self.generator is None else int(self.generator.token_count())

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context_length, do_sample=False)
        self.generator = None  # frees the previous KV buffers before allocating new ones
        self.generator = og.Generator(self.model, params)
        return self._append(np.asarray(prompt, dtype=np.int32).reshape(1, -1))

    def extend(self, tokens: np.ndarray) -> np.ndarray:
        if self.generator is None:
            return self.prefill(tokens)
        return self._append(np.asarray(tokens, dtype=np.int32).reshape(1, -1))

    def decode(self, token: int) -> np.ndarray:
        return self._append(np.array([[token]], dtype=np.int32))

    def snapshot(self) -> Snapshot:
        """onnxruntime-genai keeps its cache inside its generator and can only rewind it: a snapshot is a position
        of the current generator (no copy, no bytes), valid until the next `prefill`."""
        return Snapshot(self.length, self.generator, 0)

    def restore(self, snapshot: Snapshot) -> None:
        if snapshot.state is not self.generator or snapshot.length > self.length:
            raise AntinetError("onnxruntime-genai can only rewind its current generator: this snapshot is of an "
                               "earlier prefill or ahead of the cache; prefill again")
        self.generator.rewind_to(snapshot.length)

    def _append(self, ids: np.ndarray) -> np.ndarray:
        self.generator.append_tokens(ids)
        logits = np.asarray(self.generator.get_logits())
        return logits.reshape(-1, logits.shape[-1])[-1].astype(np.float32)
