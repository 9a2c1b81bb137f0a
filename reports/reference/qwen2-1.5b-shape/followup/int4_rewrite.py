"""Apply f39c683's integer_zero_points to an int4-block variant built before it (3be9c59), in place, as quantize
saves it: the result is byte for byte what f39c683's quantize writes (compared on SmolLM2-135M). Run with the
repository's venv at f39c683 or later: python int4_rewrite.py models/onnx/<model>-int4-block.onnx"""
import resource
import sys
import time
from pathlib import Path

import onnx

from antinet_npu.onnx_models import save
from antinet_npu.quantization import integer_zero_points

src = Path(sys.argv[1])
t = time.perf_counter()
model = onnx.load(src)
n = integer_zero_points(model)
tmp = src.parent / "rewrite-tmp" / src.name  # same file name: the .onnx names its .data file
tmp.parent.mkdir()
save(model, tmp)
del model
for suffix in ("", ".data"):
    Path(str(tmp) + suffix).replace(str(src) + suffix)
tmp.parent.rmdir()
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{n} MatMulNBits rewritten in {time.perf_counter() - t:.1f} s, peak RSS {peak_mb:.0f} MB")
