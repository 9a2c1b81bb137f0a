#!/usr/bin/env bash
# Runs one command as if on another x86 CPU kind, to check a recipe's numbers against that kind's int8 kernels
# without such a machine: QEMU's user-mode emulator (Debian package qemu-user) reports the named CPU model's
# instruction sets, and onnxruntime's kernel dispatch follows them. Default EPYC-Rome: AVX2, no AVX-512.
# Before the command it proves which integer kernel onnxruntime picked: a u8 x s8 MatMulInteger whose pair sums
# overflow int16 (AVX2's vpmaddubsw saturates them, AVX-512 VNNI does not). Numbers only: emulated code runs tens to
# hundreds of times slower, so its timings mean nothing. It runs on one core, in one process: worker processes a
# stage spawns would run natively and escape the emulation. Give the stage one thread (`threads: 1` in its section
# of a copy of params.yaml, passed with --params): onnxruntime pins its own pool threads to every core, out of the
# taskset, and emulated threads then fight over them.
# Usage: [CPU=EPYC-Rome] [CORE=n] [PY=python] emulated-cpu.sh COMMAND...
#   e.g. emulated-cpu.sh -m antinet_npu evaluate --precision int8-smooth --params params-1thread.yaml
set -eu
[ $# -gt 0 ] || { echo "usage: [CPU=EPYC-Rome] emulated-cpu.sh -m antinet_npu STAGE [ARGS...]" >&2; exit 2; }
cpu=${CPU:-EPYC-Rome}
py=$(command -v "${PY:-python}")
command -v qemu-x86_64 >/dev/null || { echo "emulated-cpu.sh: qemu-x86_64 not found: apt-get install qemu-user" >&2; exit 1; }
core=${CORE:-$("$py" -c 'import os; print(min(os.sched_getaffinity(0)))')}
run() { taskset -c "$core" qemu-x86_64 -cpu "$cpu" "$py" "$@" 2> >(grep --line-buffered -v "TCG doesn't support" >&2); }
run - <<'PY'
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
K = 64
w = helper.make_tensor("w", TensorProto.INT8, [K, 1], np.full(K, 127, np.int8).tobytes(), raw=True)
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe",
                          [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])], [w])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
    None, {"a": np.full((1, K), 255, np.uint8)})[0].item()
kind = "exact (VNNI-class kernels)" if got == 255 * 127 * K else "saturated (AVX2-class kernels)"
print(f"emulated-cpu.sh: onnxruntime {ort.__version__} u8s8 probe {got} vs exact {255 * 127 * K}: {kind}", flush=True)
PY
run "$@"
