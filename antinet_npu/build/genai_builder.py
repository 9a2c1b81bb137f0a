"""onnxruntime-genai's model builder with one float copy of the weights in memory, not two.

Run as `python -m antinet_npu.build.genai_builder <the builder's own arguments>` (stage `export-genai`, its own
process).

Before it quantizes, the builder holds its float32 graph (backed by the torch weights) and serializes a second,
in-memory copy of it for onnxruntime's MatMulNBitsQuantizer: at the Qwen2-1.5B shape 2 x 6.2 GB plus the quantized
weights, 14.3 GB (int4) / 15.3 GB (int8) peak RSS, measured. Here the float graph is written to disk first, its
in-memory tensors dropped, and the copy read back from disk is what the quantizer gets. Nothing else changes: the
builder's options, its quantizer and its output bytes are the same (a test compares them with the plain builder's).
"""

from __future__ import annotations

import gc
import importlib
import os
import runpy
import sys
import tempfile
from pathlib import Path
from unittest import mock

import onnx
import onnx_ir as ir
import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path: it imports `builders`)

base = importlib.import_module("builders.base")  # the module object the builder itself uses

_to_nbits = base.Model.to_nbits


def _to_nbits_from_disk(self) -> ir.Model:
    os.makedirs(self.cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=self.cache_dir, prefix="float-graph-") as tmp:
        path = Path(tmp) / "float.onnx"
        ir.save(self.model, path, external_data=f"{path.name}.data", size_threshold_bytes=0)
        for value in self.model.graph.initializers.values():
            value.const_value = None  # the last references to the torch weights
        gc.collect()
        proto = onnx.load(path)  # read into memory, not memory-mapped: the file can go
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    print(f"antinet-npu: float graph re-read from disk for quantization ({size / 1e6:.0f} MB)")
    to_proto = ir.to_proto

    def float_graph(model):
        return proto if model is self.model else to_proto(model)

    with mock.patch.object(base.ir, "to_proto", float_graph):
        return _to_nbits(self)


if __name__ == "__main__":
    base.Model.to_nbits = _to_nbits_from_disk
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
