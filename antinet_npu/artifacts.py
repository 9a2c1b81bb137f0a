"""Where artifacts and metrics live, and how they are written: to a temporary path first, then renamed.

A stage that fails leaves nothing half-written behind; a stage that succeeds replaces its previous output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from antinet_npu import AntinetError

MODELS = Path("models")
REPORTS = Path("reports")
LOGS = Path("logs")


def pytorch_dir(model: str) -> Path:
    return MODELS / "pytorch" / model


def onnx_path(model: str, precision: str = "fp32") -> Path:
    """FP32 export is `<model>.onnx`; CPU variants are `<model>-<precision>.onnx`; weights in `<file>.data`."""
    return MODELS / "onnx" / (f"{model}.onnx" if precision == "fp32" else f"{model}-{precision}.onnx")


def npu_onnx_path(model: str, seq_len: int) -> Path:
    """Static-shape FP32 graph for the NPU at sequence length `seq_len`."""
    return MODELS / "npu" / f"{model}-s{seq_len}.onnx"


def qdq_path(model: str, precision: str, seq_len: int) -> Path:
    """Static QDQ model (the input of QNN compilation)."""
    return MODELS / "qnn" / f"{model}-{precision}-s{seq_len}.onnx"


def ctx_path(model: str, precision: str, seq_len: int) -> Path:
    """QNN context model; its binary is the `<stem>_qnn.bin` beside it."""
    return MODELS / "qnn" / f"{model}-{precision}-s{seq_len}_ctx.onnx"


def npu_gen_dir(model: str) -> Path:
    """The NPU's FP32 generation graphs (static_llm): every part at AR-N and AR-1, signatures beside them."""
    return MODELS / "npu-gen" / model


def npu_gen_part(model: str, ar: int, index: int) -> Path:
    return npu_gen_dir(model) / f"ar{ar}-part{index}.onnx"


def npu_gen_weights(model: str, index: int) -> Path:
    """The FP32 weights of part `index`, one file that its AR-N and AR-1 graphs both read."""
    return npu_gen_dir(model) / f"part{index}.onnx.data"


def qnn_gen_dir(model: str, precision: str) -> Path:
    """The compiled generation parts: QDQ graphs, the shared context binaries for the device (one .bin per part,
    AR-N and AR-1 wrappers), and under verify/ the unshared ones the x86_64 emulator runs."""
    return MODELS / "qnn-gen" / f"{model}-{precision}"


def qnn_gen_qdq(folder: Path, ar: int, index: int) -> Path:
    return folder / f"ar{ar}-part{index}-qdq.onnx"


def qnn_gen_ctx(folder: Path, ar: int, index: int, verify: bool = False) -> Path:
    """A part's context wrapper: shared (for the device) or, with `verify`, unshared (what the emulator loads)."""
    return (folder / "verify" if verify else folder) / f"ar{ar}-part{index}_ctx.onnx"


def qnn_gen_greedy(folder: Path) -> Path:
    """Greedy tokens of compile-gen's verification prompts: FP32 parts and the host loop over verify/'s binaries."""
    return folder / "verify" / "greedy.json"


def genie_dir(model: str, precision: str) -> Path:
    """A Genie bundle: genie_config.json, htp_backend_ext_config.json, tokenizer.json and the shipped binaries
    `weight_sharing_model_<i>_of_<n>.serialized.bin`, as Qualcomm AI Hub ships LLMs."""
    return MODELS / "genie" / f"{model}-{precision}"


def genai_dir(model: str, precision: str) -> Path:
    """onnxruntime-genai model folder (model.onnx, genai_config.json, tokenizer) built by its model builder."""
    return MODELS / "genai" / f"{model}-{precision}"


def gguf_path(model: str, file_type: str) -> Path:
    """llama.cpp's build of the snapshot (export-gguf), one file."""
    return MODELS / "gguf" / f"{model}-{file_type}.gguf"


def run_artifact(model: str, what: str, precision: str, seq_len: int | None = None) -> tuple[Path, Path]:
    """What a backend loads (`what`: its `BackendSpec` artifact kind) for `precision`, and the file that holds its
    weights: the one place a run's artifact is named. The run lists under conf/ spell the same paths for DVC (its deps
    must be literal); a test holds them to this function."""
    if what == "pytorch":
        return pytorch_dir(model), pytorch_dir(model)
    if what == "onnx":
        path = onnx_path(model, precision)
        return path, external_data(path)
    if what == "genai":
        return genai_dir(model, precision), genai_dir(model, precision)
    if what == "gguf":
        return gguf_path(model, precision), gguf_path(model, precision)
    if what == "genie":
        return genie_dir(model, precision), genie_dir(model, precision)
    if what == "qnn-context" and seq_len:
        path = ctx_path(model, precision, seq_len)
        return path, path.with_name(path.stem + "_qnn.bin")
    if what == "qnn-parts":
        return qnn_gen_dir(model, precision), qnn_gen_dir(model, precision)
    if what == "npu-onnx" and seq_len:
        path = npu_onnx_path(model, seq_len)
        return path, external_data(path)
    at = f"precision {precision!r}" + (f", S={seq_len}" if seq_len else "")
    raise AntinetError(f"no {what} artifact is built at {at}")


def external_data(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def onnx_size_mb(path: Path) -> float:
    """Size of an ONNX model with its external data file, in MB (10^6 bytes)."""
    data = external_data(path)
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else (or Windows semantics): leave it alone
        return True
    return True


def remove_stale(parent: Path, kind: str) -> None:
    """Delete `.<kind>-<pid>-*` folders under `parent` whose process is gone (killed mid-write: a full model each)."""
    for leftover in parent.glob(f".{kind}-*-*"):
        pid = leftover.name[len(kind) + 2:].split("-", 1)[0]
        if leftover.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def scratch_dir(parent: Path, kind: str) -> Iterator[Path]:
    """A temporary folder `.<kind>-<pid>-*` under `parent`, removed afterwards; stale ones of dead processes too."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, kind)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{kind}-{os.getpid()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `final`; on success it replaces `final` whole."""
    with scratch_dir(final.parent, "staging") as tmp:
        out = tmp / final.name
        out.mkdir()
        yield out
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(out, final)


@contextmanager
def staged_files(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success every file written there moves into `dest` (same names).

    For outputs made of several files that reference each other by name (an ONNX model and its `.data`).
    """
    with scratch_dir(dest, "staging") as tmp:
        yield tmp
        for item in sorted(tmp.iterdir()):
            os.replace(item, dest / item.name)


def write_text(path: Path, text: str) -> None:
    write_texts({path: text})


def write_texts(files: dict[Path, str]) -> None:
    """Write several files all or none: every one to a `.partial` first, renamed only when all are written (a full
    disk or an interruption leaves the previous set, not a mix)."""
    staged = []
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.partial")
            staged.append((tmp, path))
            tmp.write_text(text, encoding="utf-8")
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n"


def metrics_text(metrics: dict[str, Any]) -> str:
    """Metrics as DVC reads them: scalars (and one level of nesting for context such as versions); NaN -> null."""
    return json_text({k: _clean(v) for k, v in metrics.items()})


def write_json(path: Path, data: Any) -> None:
    write_text(path, json_text(data))


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    write_text(path, metrics_text(metrics))


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalar
        return _clean(value.item())
    if isinstance(value, (list, tuple)):
        raise TypeError("metrics hold scalars only (dvc metrics diff drops lists)")
    return value
