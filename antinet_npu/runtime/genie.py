"""Qualcomm's LLM runtime Genie: the bundle it runs, and a dialog over its C API (ctypes).

A Genie bundle is how Qualcomm AI Hub ships an LLM for Snapdragon: `genie_config.json` (the dialog: context, tokenizer,
sampler, the QnnHtp engine), `htp_backend_ext_config.json` (soc, Hexagon arch, weight sharing), `tokenizer.json` and
one weight-shared context binary per part, `weight_sharing_model_<i>_of_<n>.serialized.bin`, each holding the part's
prompt (AR-N) and token (AR-1) graphs (`static_llm`). `genie-t2t-run -c genie_config.json -p ...`, AppBuilder's
`GenieContext` and GenieAPIService run it on a device. `bundle.json` beside them says what was built from what
(`GenieBundle`), so a runtime can refuse a bundle made for another soc, context or QNN version in one line.

`libGenie.so` ships in the onnxruntime-qnn wheel (Genie API 1.21, QNN 2.51); on x86_64 it runs the graphs on the HTP
emulator, which cannot load weight-shared binaries: there, a bundle is run over the unshared binaries of the same
graphs (`compile-gen`'s verify/).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from antinet_npu import AntinetError

log = logging.getLogger(__name__)

CONFIG = "genie_config.json"
HTP_CONFIG = "htp_backend_ext_config.json"
TOKENIZER = "tokenizer.json"
MANIFEST = "bundle.json"
_SENTENCE_COMPLETE = 0
_ACTION_ABORT = 1
_STATUS = {-1: "general error", -2: "invalid argument", -3: "out of memory", -4: "invalid config",
           -5: "invalid handle", -6: "query failed", -7: "config is not valid JSON",
           -8: "config does not match Genie's JSON schema", -9: "bad value in config", -10: "generation failed"}
_LEVELS = {1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.DEBUG}


def binary_name(index: int, count: int) -> str:
    """AI Hub's name for part `index` (from 0) of `count`."""
    return f"weight_sharing_model_{index + 1}_of_{count}.serialized.bin"


@dataclass(frozen=True)
class BundleFile:
    name: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> BundleFile:
        return cls(path.name, path.stat().st_size, sha256(path))

    def check(self, folder: Path) -> Path:
        """The file, or a one-line error when it is missing, truncated or changed since the bundle was written."""
        path = folder / self.name
        if not path.is_file():
            raise AntinetError(f"{path} is missing from the Genie bundle: re-run `dvc repro genie`")
        if path.stat().st_size != self.bytes or sha256(path) != self.sha256:
            raise AntinetError(f"{path} is damaged ({path.stat().st_size} bytes, the bundle wrote {self.bytes}, or "
                               "its contents changed): delete the bundle and re-run `dvc repro genie`")
        return path


@dataclass(frozen=True)
class GenieBundle:
    """What a bundle holds and was built for (`bundle.json`); `dialog_config` / `htp_config` are its Genie files."""

    model: str
    precision: str
    context_length: int
    prefill_len: int
    parts: int
    n_vocab: int
    bos_token: int
    eos_tokens: tuple[int, ...]
    pad_token: int                # what Genie pads a short prompt chunk with (it falls back to eos-token, which a
                                  # benchmark config sets to -1: an out-of-range id fails the embedding gather)
    kv_dim: int
    rope_theta: float
    soc_model: int
    dsp_arch: str
    qnn_sdk_version: str          # the QNN build the binaries were compiled with (EPContext's ep_sdk_version)
    graphs: tuple[str, ...]       # graph names, in the order Genie runs the parts (`Part.graph_name`)
    binaries: tuple[BundleFile, ...] = ()
    tokenizer: BundleFile | None = None

    def dialog_config(self, ctx_bins: Sequence[str], *, tokenizer: str = TOKENIZER, extensions: str = HTP_CONFIG,
                      use_mmap: bool = True, n_threads: int = 3, graph_switching: bool = False) -> dict:
        """genie_config.json: a basic dialog, greedy (top-k 1), over `ctx_bins` (paths as Genie should open them:
        relative to where genie-t2t-run starts, in the shipped file). `graph_switching`: Genie keeps one AR variant's
        graphs loaded at a time (its enable-graph-switching), for a process that cannot hold both at once."""
        htp = {"version": 1, "use-mmap": use_mmap, "spill-fill-bufsize": 0, "mmap-budget": 0, "poll": True,
               "cpu-mask": "0xe0", "kv-dim": self.kv_dim, "pos-id-dim": self.kv_dim // 2, "allow-async-init": False,
               "rope-theta": self.rope_theta, **({"enable-graph-switching": True} if graph_switching else {})}
        return {"dialog": {
            "version": 1, "type": "basic",
            "context": {"version": 1, "size": self.context_length, "n-vocab": self.n_vocab,
                        "bos-token": self.bos_token, "eos-token": list(self.eos_tokens),
                        "pad-token": self.pad_token},
            "sampler": {"version": 1, "seed": 42, "temp": 1.0, "top-k": 1, "top-p": 1.0},
            "tokenizer": {"version": 1, "path": tokenizer},
            "engine": {
                "version": 1, "n-threads": n_threads,
                "backend": {"version": 1, "type": "QnnHtp", "extensions": extensions, "QnnHtp": htp},
                "model": {"version": 1, "type": "binary", "binary": {"version": 1, "ctx-bins": list(ctx_bins)}},
            }}}

    def htp_config(self, weight_sharing: bool = True) -> dict:
        """htp_backend_ext_config.json (AI Hub's): the soc and Hexagon arch the binaries were compiled for."""
        return {"devices": [{"soc_model": self.soc_model, "dsp_arch": self.dsp_arch,
                             "cores": [{"core_id": 0, "perf_profile": "burst", "rpc_control_latency": 100}]}],
                "memory": {"mem_type": "shared_buffer"}, "context": {"weight_sharing_enabled": weight_sharing}}

    def write(self, folder: Path) -> None:
        from antinet_npu.artifacts import write_json

        write_json(folder / MANIFEST, asdict(self))

    @classmethod
    def read(cls, folder: Path) -> GenieBundle:
        path = folder / MANIFEST
        if not path.is_file():
            raise AntinetError(f"{path} not found: {folder} is not a Genie bundle built here; run `dvc repro genie`")
        try:
            data = json.loads(path.read_text())
            data["binaries"] = tuple(BundleFile(**b) for b in data["binaries"])
            data["tokenizer"] = BundleFile(**data["tokenizer"]) if data.get("tokenizer") else None
            return cls(**{**data, "eos_tokens": tuple(data["eos_tokens"]), "graphs": tuple(data["graphs"])})
        except (ValueError, TypeError, KeyError) as exc:
            raise AntinetError(f"{path} is damaged ({exc}): delete the bundle and re-run `dvc repro genie`") from None

    def check_runtime(self, soc_model: int, qnn_version: str | None) -> None:
        """One line when this bundle cannot run here: another soc, or another QNN version than the runtime's (the
        field reports that as 'error 5000' at context creation, with nothing more)."""
        if soc_model != self.soc_model:
            raise AntinetError(f"this Genie bundle was compiled for soc_model {self.soc_model}, the target is "
                               f"{soc_model}: rebuild it for the target (`dvc repro genie` with target.soc_model)")
        built = _major_minor(self.qnn_sdk_version)
        if qnn_version is not None and built is not None and _major_minor(qnn_version) != built:
            raise AntinetError(f"this Genie bundle was compiled with QNN {self.qnn_sdk_version} but the runtime is "
                               f"QNN {qnn_version} (context binaries load only on the QNN version that built them, "
                               "'error 5000' on a device): rebuild the bundle with the runtime's onnxruntime-qnn")


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.lstrip("v").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_special_tokens(tokenizer_json: Path, ids: Sequence[int]) -> None:
    """The special tokens a dialog names (bos, eos) must exist in the tokenizer Genie loads."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    known = {t["id"] for t in data.get("added_tokens", [])} | set((data.get("model") or {}).get("vocab", {}).values())
    missing = sorted(i for i in ids if i >= 0 and i not in known)
    if missing:
        raise AntinetError(f"{tokenizer_json} has no token with id {', '.join(map(str, missing))}, which the Genie "
                           "dialog names as bos/eos/pad: fix the model's bos/eos/pad_token_id or its tokenizer")


def prepended_bos(tokenizer_json: Path) -> int:
    """The bundle's `bos-token`: the token the model's tokenizer puts before a text's tokens, or -1 for none.

    Genie prepends `bos-token` to the first query of a dialog whenever it is >= 0 (qualla's dialog.cpp), while a
    Qwen2 or SmolLM2 tokenizer adds no BOS although their configs name a `bos_token_id`: copying that id (as AI Hub's
    export does) gives Genie a context the model never had in transformers (measured on the builtin fp16 bundle: one
    prompt of four generated other greedy tokens until this was -1)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    text = "Hello world"
    plain, special = tokenizer.encode(text, add_special_tokens=False).ids, tokenizer.encode(text).ids
    added = len(special) - len(plain)
    if special[added:] != plain or added > 1:
        raise AntinetError(f"{tokenizer_json} adds special tokens other than one leading BOS when it encodes a text "
                           f"({special} for {plain}): a Genie dialog can only prepend one bos-token")
    return special[0] if added else -1


def for_whole_prompts(config: dict) -> dict:
    """`config` for a caller that passes the whole prompt, any BOS its tokenizer added included: Genie must not
    prepend `bos-token` again."""
    config = json.loads(json.dumps(config))
    config["dialog"]["context"]["bos-token"] = -1
    return config


def resolve_paths(config: dict, base: Path) -> dict:
    """A dialog config whose file paths (tokenizer, extensions, ctx-bins) are relative to `base`, as genie-t2t-run
    started in `base` would open them, with those paths made absolute (this process does not change directory)."""
    config = json.loads(json.dumps(config))
    dialog = config["dialog"]
    engine = dialog["engine"]

    def absolute(p: str) -> str:
        return str((base / p).resolve()) if not Path(p).is_absolute() else p

    dialog["tokenizer"]["path"] = absolute(dialog["tokenizer"]["path"])
    engine["backend"]["extensions"] = absolute(engine["backend"]["extensions"])
    binary = engine["model"]["binary"]
    binary["ctx-bins"] = [absolute(p) for p in binary["ctx-bins"]]
    return config


# --- the runtime ------------------------------------------------------------------------------------------------

def library_path() -> Path:
    """libGenie from the onnxruntime-qnn wheel (Genie.dll on Windows), or a one-line error naming the extra."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise AntinetError("Genie (libGenie) ships in onnxruntime-qnn, which is not installed: install the qnn extra "
                           "(pip install 'antinet-npu[qnn]')") from None
    path = Path(onnxruntime_qnn.__file__).parent / ("Genie.dll" if sys.platform == "win32" else "libGenie.so")
    if not path.is_file():
        raise AntinetError(f"{path} not found: this onnxruntime-qnn build ships no Genie runtime; reinstall the qnn "
                           "extra (onnxruntime-qnn 2.7.0 has it)")
    return path


def qnn_version() -> str | None:
    """The QNN version of the runtime next to libGenie (the onnxruntime-qnn wheel's)."""
    try:
        from onnxruntime_qnn.build_and_package_info import qnn_version as version
    except ImportError:
        return None
    return version


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint64,
                                 ctypes.c_void_p)
_TOKEN_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_int,
                                   ctypes.c_void_p)


class _Library:
    """libGenie's C API, loaded once per process."""

    _loaded: _Library | None = None

    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        handle, status = ctypes.c_void_p, ctypes.c_int32
        sigs = {
            "Genie_getApiMajorVersion": ([], ctypes.c_uint32), "Genie_getApiMinorVersion": ([], ctypes.c_uint32),
            "Genie_getApiPatchVersion": ([], ctypes.c_uint32),
            "GenieLog_create": ([handle, _LOG_CALLBACK, ctypes.c_int, ctypes.POINTER(handle)], status),
            "GenieLog_free": ([handle], status),
            "GenieDialogConfig_createFromJson": ([ctypes.c_char_p, ctypes.POINTER(handle)], status),
            "GenieDialogConfig_bindLogger": ([handle, handle], status),
            "GenieDialogConfig_free": ([handle], status),
            "GenieDialog_create": ([handle, ctypes.POINTER(handle)], status),
            "GenieDialog_tokenQuery": ([handle, ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32, ctypes.c_int,
                                        _TOKEN_CALLBACK, ctypes.c_void_p], status),
            "GenieDialog_setMaxNumTokens": ([handle, ctypes.c_uint32], status),
            "GenieDialog_reset": ([handle], status),
            "GenieDialog_signal": ([handle, ctypes.c_int], status),
            "GenieDialog_free": ([handle], status),
        }
        for name, (args, result) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        libc = ctypes.CDLL("msvcrt" if sys.platform == "win32" else None)  # Genie's log hands over a va_list
        self.vsnprintf = libc.vsnprintf
        self.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    @classmethod
    def get(cls) -> _Library:
        if cls._loaded is None:
            cls._loaded = cls(library_path())
        return cls._loaded

    def version(self) -> str:
        lib = self.lib
        return f"{lib.Genie_getApiMajorVersion()}.{lib.Genie_getApiMinorVersion()}.{lib.Genie_getApiPatchVersion()}"


@contextlib.contextmanager
def _native_output(into: list[str]):
    """Collect what the process's native code writes to stdout/stderr meanwhile (lines kept as 'out:<line>' and
    logged at DEBUG), instead of letting it through unmarked."""
    import os
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                if line.strip():
                    into.append(f"out:{line.strip()}")
                    log.debug("genie: %s", line.strip())


def api_version() -> str:
    """The Genie API version of the runtime (libGenie)."""
    return _Library.get().version()


@dataclass
class Generation:
    """One `Dialog.generate`: the new tokens and when each arrived (ns since the query started)."""

    tokens: list[int] = field(default_factory=list)
    arrival_ns: list[int] = field(default_factory=list)


class Dialog:
    """A Genie dialog over a config (`GenieBundle.dialog_config`, paths resolved). Genie's log lines go to this
    module's logger (INFO and below at DEBUG: Genie is chatty) and are kept in `log_lines`; a failure is one line
    naming Genie's own last error."""

    def __init__(self, config: dict):
        self.api = _Library.get()
        self.log_lines: list[str] = []
        self._log_cb = _LOG_CALLBACK(self._on_log)  # kept referenced: Genie calls it until the log is freed
        self._log = ctypes.c_void_p()
        self._config = ctypes.c_void_p()
        self.handle = ctypes.c_void_p()
        lib = self.api.lib
        self._check(lib.GenieLog_create(None, self._log_cb, 3, ctypes.byref(self._log)), "create a log")
        config = for_whole_prompts(config)  # prompts arrive as token ids, already as the model's tokenizer made them
        self._check(lib.GenieDialogConfig_createFromJson(json.dumps(config).encode(), ctypes.byref(self._config)),
                    "read the dialog config")
        self._check(lib.GenieDialogConfig_bindLogger(self._config, self._log), "bind its log")
        start = time.perf_counter()
        with _native_output(self.log_lines):  # model validation errors are printed, not logged, by Genie
            status = lib.GenieDialog_create(self._config, ctypes.byref(self.handle))
        self._check(status, "create the dialog")
        self.load_seconds = time.perf_counter() - start

    def _on_log(self, _handle, fmt, level, _timestamp, args) -> None:
        buf = ctypes.create_string_buffer(4096)
        self.api.vsnprintf(buf, len(buf), fmt, args)
        line = buf.value.decode(errors="replace").strip()
        self.log_lines.append(f"{level}:{line}")
        log.log(logging.ERROR if level == 1 else logging.WARNING if level == 2 else logging.DEBUG, "genie: %s", line)

    def errors(self) -> list[str]:
        """Genie's error lines: logged at level 1, or printed with an [ERROR] mark (first printed one first: the
        lines after it explain less)."""
        printed = [line.split(":", 1)[1] for line in self.log_lines if line.startswith("out:") and "[ERROR]" in line
                   and "Note:" not in line and "dump-specs" not in line]
        return [line.split(":", 1)[1] for line in self.log_lines if line.startswith("1:")] + printed[:1]

    def _check(self, status: int, what: str) -> None:
        if status < 0:
            said = self.errors()
            reason = said[-1] if said else _STATUS.get(status, f"status {status}")
            self.close()
            raise AntinetError(f"Genie could not {what}: {reason[:300]}")

    def generate(self, prompt: Sequence[int], max_new_tokens: int,
                 on_token: Callable[[int], bool | None] | None = None) -> Generation:
        """Greedy tokens after `prompt` (token ids, no template added), at most `max_new_tokens`; Genie stops at
        an EOS token (not returned). The dialog's cache restarts first. `on_token` is called as each token arrives."""
        lib = self.api.lib
        out = Generation()
        start = 0

        def collect(tokens, count, _code, _user):
            for i in range(count):
                out.tokens.append(int(tokens[i]))
                out.arrival_ns.append(time.perf_counter_ns() - start)
                if on_token is not None:
                    on_token(int(tokens[i]))

        callback = _TOKEN_CALLBACK(collect)
        ids = (ctypes.c_uint32 * len(prompt))(*(int(t) for t in prompt))
        self._check(lib.GenieDialog_reset(self.handle), "reset the dialog")
        self._check(lib.GenieDialog_setMaxNumTokens(self.handle, max_new_tokens), "set max tokens")
        start = time.perf_counter_ns()
        self._check(lib.GenieDialog_tokenQuery(self.handle, ids, len(prompt), _SENTENCE_COMPLETE, callback, None),
                    "generate")
        return out

    def abort(self) -> None:
        """Stop a generation running in another thread after its current step (GENIE_DIALOG_ACTION_ABORT)."""
        if self.handle:
            self.api.lib.GenieDialog_signal(self.handle, _ACTION_ABORT)

    def __del__(self) -> None:
        # a dialog dropped unclosed leaves libGenie holding a log callback Python frees with this object: free the
        # native side first (suspected cause of a segfault in a frameless thread, once, in a full test run)
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        lib = self.api.lib
        if self.handle:
            lib.GenieDialog_free(self.handle)
            self.handle = ctypes.c_void_p()
        if self._config:
            lib.GenieDialogConfig_free(self._config)
            self._config = ctypes.c_void_p()
        if self._log:
            lib.GenieLog_free(self._log)
            self._log = ctypes.c_void_p()

    def graph_order(self) -> list[tuple[str, int, int, int]]:
        """(graph, split index, AR, CL) as Genie placed each graph, read from its log ('Inserting graph ...')."""
        import re

        found = []
        for line in self.log_lines:
            m = re.search(r"Inserting graph (\S+) as idx (\d+) for AR-(\d+) CL-(\d+)", line)
            if m:
                found.append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))))
        return found


def appbuilder_reason() -> str | None:
    """Why AppBuilder's `GenieContext` cannot run here (None: it can)."""
    if sys.platform != "win32":
        return f"AppBuilder's GenieContext runs only on Windows on Snapdragon (this is {sys.platform})"
    try:
        from qai_appbuilder import GenieContext  # noqa: F401
    except ImportError:
        return "qai_appbuilder with GenieContext is not installed: pip install 'antinet-npu[appbuilder]' (Windows only)"
    return None


class AppBuilderDialog:
    """The same bundle through QAI AppBuilder's LLM API, `qai_appbuilder.GenieContext` (Windows on Snapdragon), with
    `Dialog`'s interface. AppBuilder's API is text in, text out (`Query(prompt, callback)`, one callback per token's
    text, `SetParams(max_length, temp, top_k, top_p)` as strings, `Stop()`): the prompt is decoded with the bundle's
    tokenizer and each piece Genie streams is encoded back, so a token that does not round-trip through its own text
    can count differently than with `Dialog`. Contract-tested against AppBuilder's documented API only."""

    def __init__(self, config: dict, tokenizer_json: Path):
        import tempfile

        from qai_appbuilder import GenieContext
        from tokenizers import Tokenizer

        self.context = None
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        # GenieContext reads a config file: the resolved one (absolute paths) lives beside nothing the user owns
        fd, name = tempfile.mkstemp(prefix="antinet-genie-", suffix=".json")
        with open(fd, "w") as f:  # the prompt's text is decoded from its ids, any BOS included
            json.dump(for_whole_prompts(config), f)
        self.config_path = Path(name)
        start = time.perf_counter()
        try:
            self.context = GenieContext(str(self.config_path))
        except Exception as exc:  # AppBuilder raises whatever its binding raises: one line, the config named
            self.close()
            raise AntinetError(f"AppBuilder's GenieContext could not load the bundle: {exc}") from exc
        self.load_seconds = time.perf_counter() - start

    def generate(self, prompt: Sequence[int], max_new_tokens: int,
                 on_token: Callable[[int], bool | None] | None = None) -> Generation:
        out = Generation()
        start = 0

        def collect(text: str) -> bool:
            for token in self.tokenizer.encode(text, add_special_tokens=False).ids:
                out.tokens.append(token)
                out.arrival_ns.append(time.perf_counter_ns() - start)
                if on_token is not None:
                    on_token(token)
            return True  # keep generating (AppBuilder stops at max_length or EOS)

        # top-k 1: greedy, as the bundle's own sampler
        if self.context.SetParams(str(max_new_tokens), "1.0", "1", "1.0") is False:
            raise AntinetError("AppBuilder's GenieContext refused SetParams(max_length, temp, top_k, top_p)")
        start = time.perf_counter_ns()
        self.context.Query(self.tokenizer.decode(list(prompt), skip_special_tokens=False), collect)
        del out.tokens[max_new_tokens:], out.arrival_ns[max_new_tokens:]
        return out

    def abort(self) -> None:
        if self.context is not None:
            self.context.Stop()

    def close(self) -> None:
        self.context = None  # AppBuilder frees the dialog when its wrapper goes
        self.config_path.unlink(missing_ok=True)
