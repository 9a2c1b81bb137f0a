"""PyTorch eager on the `prepare` snapshot: the baseline every variant is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from antinet_npu.build import checkpoint
from antinet_npu.runtime.backends.base import SINGLE_PASS, Backend
from antinet_npu.runtime.generation import CopiedStateMixin


class TorchBackend(Backend):
    name = "torch"

    def load(self, artifact: Path, kind: str = SINGLE_PASS) -> None:
        import torch

        if self.cfg.bench.threads:
            torch.set_num_threads(self.cfg.bench.threads)
        self.model = checkpoint.load_snapshot(artifact, attn_implementation="sdpa")

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(input_ids.astype(np.int64)), use_cache=False).logits.numpy()

    def stepper(self) -> TorchStepper:
        return TorchStepper(self.model)

    def describe(self) -> dict:
        import torch

        return {"backend": self.name, "device": "cpu", "emulated": False, "threads": torch.get_num_threads()}


class TorchStepper(CopiedStateMixin):
    """transformers' own KV cache (DynamicCache), one forward per call, as `generate()` does."""

    def __init__(self, model):
        self.model, self.past, self.length = model, None, 0
        self.context_length = checkpoint.max_positions(model.config)

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.past, self.length = None, 0
        return self.extend(prompt)

    def extend(self, tokens: np.ndarray) -> np.ndarray:
        return self._run(np.asarray(tokens, dtype=np.int64).reshape(1, -1))

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([[token]], dtype=np.int64))

    def _run(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids), past_key_values=self.past, use_cache=True,
                             logits_to_keep=1)
        self.past = out.past_key_values
        self.length += ids.shape[1]
        return out.logits[0, -1].float().numpy()
