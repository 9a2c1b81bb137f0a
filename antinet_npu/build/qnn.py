"""The QNN execution provider (onnxruntime-qnn, plugin form): registration, provider options, context binaries.

On Linux/Windows x86_64 the HTP backend is Qualcomm's emulator of the Hexagon NPU: real graphs and real context
binaries, but its timings say nothing about the NPU, so everything it runs is labelled `emulated`.
"""

from __future__ import annotations

import platform
import struct
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from antinet_npu import AntinetError
from antinet_npu.build.static_llm import SessionCache
from antinet_npu.config import TargetConfig

EP_NAME = "QNNExecutionProvider"
BACKENDS = ("htp", "gpu")
BOUNDARY_OPS = ("QuantizeLinear", "DequantizeLinear")  # graph-edge conversions, not compute
_registered = False


def require():
    """The onnxruntime_qnn module, or a one-line error saying how to get it."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise AntinetError("onnxruntime-qnn is not installed: install the qnn extra "
                           "(pip install 'antinet-npu[qnn]')") from None
    return onnxruntime_qnn


def emulated() -> bool:
    """True where the HTP backend is the x86_64 emulator rather than a Hexagon NPU."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686")


def device_name(backend: str = "htp") -> str:
    if backend == "gpu":
        return "adreno-gpu"
    return "hexagon-htp-emulator" if emulated() else "hexagon-npu"


def register() -> list:
    """Register the plugin EP once per process; returns its devices."""
    global _registered
    import onnxruntime as ort

    qnn = require()
    if not _registered:
        ort.register_execution_provider_library(EP_NAME, qnn.get_library_path())
        _registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise AntinetError("onnxruntime-qnn registered no QNN device: reinstall the qnn extra")
    return devices


def provider_options(target: TargetConfig, backend: str = "htp", perf_mode: str | None = None) -> dict[str, str]:
    qnn = require()
    if backend == "gpu":
        return {"backend_path": qnn.get_qnn_gpu_path()}
    return {
        "backend_path": qnn.get_qnn_htp_path(),
        "soc_model": str(target.soc_model),
        "htp_arch": str(target.htp_arch),
        "htp_performance_mode": perf_mode or target.htp_performance_mode,
        "htp_graph_finalization_optimization_mode": str(target.htp_graph_finalization_optimization_mode),
    }


def session(model: Path, target: TargetConfig, *, backend: str = "htp", perf_mode: str | None = None,
            context_out: Path | None = None, allow_cpu_fallback: bool = True, share: str | None = None,
            fp16: bool = False):
    """An onnxruntime session on the QNN backend; with `context_out`, also writes a context binary there; `fp16`
    runs a float graph's float ops at fp16 on HTP (without it HTP refuses float32 compute).

    `share`: "continue" or "last" compiles into one context shared with the other sessions of this process (one
    weight copy for graphs with the same weights; "last" writes it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if context_out is not None:
        opts.add_session_config_entry("ep.context_enable", "1")
        opts.add_session_config_entry("ep.context_file_path", str(context_out))
        opts.add_session_config_entry("ep.context_embed_mode", "0")  # the .bin beside the _ctx.onnx
    if share:
        opts.add_session_config_entry("ep.share_ep_contexts", "1")
        if share == "last":
            opts.add_session_config_entry("ep.stop_share_ep_contexts", "1")
    if not allow_cpu_fallback:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options = provider_options(target, backend, perf_mode)
    if share:
        options["enable_htp_weight_sharing"] = "1"
    if fp16:
        options["enable_htp_fp16_precision"] = "1"
    opts.add_provider_for_devices(register(), options)
    try:
        return ort.InferenceSession(str(model), opts)
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / RuntimeException
        first = str(exc).strip().splitlines()[0][:300]
        raise AntinetError(f"the QNN {backend.upper()} backend could not build {model.name}: {first}") from None


@dataclass
class HtpGraphs:
    """Context models on the HTP backend, opened on first use and kept once per process, one shape (tokens per call)
    at a time (`static_llm.SessionCache`). Plain data until then, so it pickles into the worker processes that
    verification is spread over (`cores.spread`)."""

    target: TargetConfig
    allow_cpu_fallback: bool = False
    sessions: SessionCache = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.sessions = SessionCache(self._session)

    def _session(self, model: Path):
        return session(model, self.target, allow_cpu_fallback=self.allow_cpu_fallback)

    def __getstate__(self) -> dict:
        return {"target": self.target, "allow_cpu_fallback": self.allow_cpu_fallback}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def open(self, model: Path):
        return self.sessions(model)

    def close(self) -> None:
        self.sessions.close()


def verify_workers(wanted: int) -> int:
    """Processes to verify in: several only on the emulator (a device has one NPU to share)."""
    return wanted if emulated() else 1


def compile_context(qdq_model: Path, ctx_model: Path, target: TargetConfig, allow_cpu_fallback: bool = False,
                    fp16: bool = False) -> None:
    """Ahead-of-time compile `qdq_model` into `ctx_model` (`<name>_ctx.onnx`) and its `<name>_ctx_qnn.bin`.

    Without `allow_cpu_fallback` every node must land in the QNN context. When one does not, the graph is compiled
    once more with fallback allowed, only to name the nodes the HTP backend rejected. The EP refuses to overwrite,
    so `ctx_model` must not exist yet.
    """
    if ctx_model.exists():
        raise AntinetError(f"{ctx_model} already exists and the QNN EP will not overwrite it: remove it first")
    try:
        session(qdq_model, target, context_out=ctx_model, allow_cpu_fallback=allow_cpu_fallback, fp16=fp16)
    except AntinetError:
        _remove_context(ctx_model)  # the EP may have written it before the session failed
        if allow_cpu_fallback:
            raise
        probe = ctx_model.with_name(f"probe-{ctx_model.name}")
        session(qdq_model, target, context_out=probe, allow_cpu_fallback=True, fp16=fp16)
        _, outside = nodes_outside_context(probe, boundary_is_compute=True)
        _remove_context(probe)
        if not outside:
            raise
        name, op = outside[0]
        raise AntinetError(f"{len(outside)} node(s) of {qdq_model.name} would run on CPU, e.g. {name!r} (op {op}): "
                           "the HTP backend rejected them; exclude or rewrite them, or set "
                           "compile.allow_cpu_fallback=true") from None
    if not ctx_model.is_file():
        raise AntinetError(f"the QNN EP wrote no context model for {qdq_model.name}")


def compile_shared(qdq_models: list[Path], ctx_models: list[Path], target: TargetConfig, fp16: bool = False) -> None:
    """Compile graphs with the same weights (a part's AR-N and AR-1) into one context binary: one `.bin`, named
    after the first wrapper, referenced by every `_ctx.onnx`. Compile each alone first (`compile_context`): that
    is where a node the HTP backend rejects gets its name. Offline only: the x86_64 emulator cannot load the result
    (it crashes the process), so graphs are verified from their unshared binaries."""
    sessions = []
    try:
        for k, (qdq, ctx) in enumerate(zip(qdq_models, ctx_models)):
            if ctx.exists():
                raise AntinetError(f"{ctx} already exists and the QNN EP will not overwrite it: remove it first")
            sessions.append(session(qdq, target, context_out=ctx, allow_cpu_fallback=False, fp16=fp16,
                                    share="last" if k == len(qdq_models) - 1 else "continue"))
    except AntinetError as exc:
        raise AntinetError(f"the QNN EP could not share one context between {', '.join(q.name for q in qdq_models)}"
                           f" ({exc}): set compile.generation.share=false to build them unshared") from None
    finally:
        del sessions
    binaries = {b for ctx in ctx_models for b in context_binaries(ctx)}
    if len(binaries) != 1:
        raise AntinetError(f"the QNN EP wrote {len(binaries)} context binaries for {len(ctx_models)} shared graphs "
                           "(expected one)")


def name_graphs(names: dict[Path, str]) -> None:
    """Rename the graph of each context model (`_ctx.onnx` -> new name), in its wrapper and in its binary.

    Genie orders a model's parts by graph name (`<prefix>_<i>_of_<n>`, `Part.graph_name`), but the QNN EP names a
    graph after a hash of the model's path, and `ep.context_node_name_prefix` does not reach the name inside the
    binary (QNN 2.51). The binary stores each name as a length-prefixed, NUL-terminated string (some with a
    `PICKLE/256/` prefix); a name no longer than the old one is written in place with its new length and zeros after
    it, so no offset in the file moves. Every occurrence must be found, or nothing is written."""
    by_binary: dict[Path, dict[str, str]] = {}
    wrappers = {}
    for ctx, new in names.items():
        model = onnx.load(ctx, load_external_data=False)
        nodes = [n for n in model.graph.node if n.op_type == "EPContext"]
        binaries = context_binaries(ctx)
        if len(nodes) != 1 or len(binaries) != 1:
            raise AntinetError(f"{ctx} holds {len(nodes)} EPContext node(s) over {len(binaries)} binaries: cannot "
                               "name its graph (one of each expected)")
        old = nodes[0].name
        if len(new.encode()) > len(old.encode()):
            raise AntinetError(f"graph name {new!r} is longer than the QNN EP's {old!r}: it cannot be written in place")
        by_binary.setdefault(binaries[0], {})[old] = new
        wrappers[ctx] = (model, nodes[0], new)
    blobs = {binary: _renamed(binary, renames) for binary, renames in by_binary.items()}
    for binary, blob in blobs.items():
        binary.write_bytes(blob)
    for ctx, (model, node, new) in wrappers.items():
        node.name = new
        for attr in node.attribute:
            if attr.name == "partition_name":
                attr.s = new.encode()
        onnx.save(model, ctx)


def _renamed(binary: Path, renames: dict[str, str]) -> bytes:
    """The bytes of `binary` with every length-prefixed string that ends in an old graph name rewritten."""
    data = bytearray(binary.read_bytes())
    for old, new in renames.items():
        needle, found = old.encode(), 0
        at = data.find(needle)
        while at >= 0:
            end = at + len(needle)
            # the string holding this occurrence starts a few bytes before it (a prefix) or at it
            start = next((s for s in range(at, max(at - 64, 4) - 1, -1)
                          if struct.unpack_from("<I", data, s - 4)[0] == end - s), None)
            if start is None or end >= len(data) or data[end] != 0:
                raise AntinetError(f"{binary.name}: graph name {old!r} found outside a length-prefixed string: this "
                                   "QNN context binary layout is not the one `qnn.name_graphs` knows")
            text = bytes(data[start:at]) + new.encode()
            struct.pack_into("<I", data, start - 4, len(text))
            data[start:end] = text + b"\0" * (end - start - len(text))
            found += 1
            at = data.find(needle, end)
        if not found:
            raise AntinetError(f"{binary.name} does not hold graph {old!r}: delete it and re-run "
                               "`dvc repro compile-gen`")
    return bytes(data)


def graph_names(binary: Path) -> list[str]:
    """The graph names a context binary holds, as written by the QNN EP or `name_graphs` (plain length-prefixed
    strings that an EPContext wrapper beside it names)."""
    data = binary.read_bytes()
    names = []
    for ctx in binary.parent.glob("*_ctx.onnx"):
        if binary in context_binaries(ctx):
            names += [n.name for n in onnx.load(ctx, load_external_data=False).graph.node if n.op_type == "EPContext"]
    return sorted({n for n in names if struct.pack("<I", len(n)) + n.encode() + b"\0" in data})


def _remove_context(ctx_model: Path) -> None:
    if ctx_model.is_file():
        for path in context_binaries(ctx_model):
            path.unlink(missing_ok=True)
        ctx_model.unlink()


def context_binaries(ctx_model: Path) -> list[Path]:
    """The `.bin` files an EPContext model references (relative to it)."""
    model = onnx.load(ctx_model, load_external_data=False)
    out = []
    for node in model.graph.node:
        if node.op_type == "EPContext":
            attrs = {a.name: a for a in node.attribute}
            if "ep_cache_context" in attrs and attrs.get("embed_mode") and attrs["embed_mode"].i == 0:
                out.append(ctx_model.parent / attrs["ep_cache_context"].s.decode())
    return out


def io_bytes(ctx_model: Path, types: dict[str, int] | None = None) -> int:
    """Bytes one call of a context model moves between the host and the NPU graph: its inputs and outputs as the
    wrapper declares them, or with the element sizes in `types` (name prefix -> bytes) where given."""
    import numpy as np
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(ctx_model, load_external_data=False)
    total = 0
    for value in (*model.graph.input, *model.graph.output):
        tensor = value.type.tensor_type
        size = next((b for prefix, b in (types or {}).items() if value.name.startswith(prefix)),
                    np.dtype(tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize)
        total += size * int(np.prod([d.dim_value for d in tensor.shape.dim]))
    return total


def sdk_version(ctx_model: Path) -> str:
    """The QNN SDK build a context model's binary was compiled with (its EPContext node's `ep_sdk_version`)."""
    model = onnx.load(ctx_model, load_external_data=False)
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "EPContext" and attr.name == "ep_sdk_version":
                return attr.s.decode()
    raise AntinetError(f"{ctx_model} records no QNN SDK version (ep_sdk_version): re-run `dvc repro compile-gen`")


def nodes_outside_context(ctx_model: Path, boundary_is_compute: bool = False) -> tuple[int, list[tuple[str, str]]]:
    """(number of EPContext nodes, [(name, op_type)] of nodes left to run on CPU).

    Quantize/DequantizeLinear nodes are not counted unless `boundary_is_compute`.
    """
    model = onnx.load(ctx_model, load_external_data=False)
    contexts = sum(n.op_type == "EPContext" for n in model.graph.node)
    outside = [(n.name, n.op_type) for n in model.graph.node
               if n.op_type != "EPContext" and (boundary_is_compute or n.op_type not in BOUNDARY_OPS)]
    return contexts, outside
