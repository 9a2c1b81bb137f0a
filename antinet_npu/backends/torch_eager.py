"""PyTorch eager on the `prepare` snapshot: the baseline every variant is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from antinet_npu import checkpoint
from antinet_npu.backends import Backend


class TorchBackend(Backend):
    name = "torch"

    def load(self, artifact: Path) -> None:
        import torch

        if self.cfg.bench.threads:
            torch.set_num_threads(self.cfg.bench.threads)
        self.model = checkpoint.load_snapshot(artifact, attn_implementation="sdpa")

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(input_ids.astype(np.int64)), use_cache=False).logits.numpy()

    def describe(self) -> dict:
        import torch

        return {"backend": self.name, "device": "cpu", "emulated": False, "threads": torch.get_num_threads()}
