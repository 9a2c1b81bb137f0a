"""llama.cpp (the CPU peer beside onnxruntime-genai), through llama-cpp-python, on a GGUF built by `export-gguf`.

Token ids in, logits out, one call per step: the same loop and the same clock as our backends. llama-cpp-python
builds llama.cpp from source for the machine it installs on (about 10 minutes on 2 cores), so it is an extra:
`make shape-1.5b` installs it; the builtin DAG does not run it.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.runtime.backends.base import SINGLE_PASS, Backend
from antinet_npu.runtime.generation import Snapshot

EXTRA = "pip install 'antinet-npu[llamacpp]' (llama-cpp-python, built from source: about 10 minutes)"


def require():
    global _log
    try:
        import llama_cpp
    except ImportError:
        raise AntinetError(f"llama-cpp-python is not installed: {EXTRA}") from None
    if _log is None:  # llama.cpp's warnings and errors only: its loader and quantizer print a line per tensor
        @llama_cpp.llama_log_callback
        def _log(level: int, text: bytes, _user_data) -> None:
            if level in (3, 4):  # GGML_LOG_LEVEL_WARN, _ERROR (ggml.h: DEBUG 1, INFO 2, CONT 5)
                sys.stderr.write(text.decode(errors="replace"))

        llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    return llama_cpp


_log = None  # the installed callback, kept referenced for as long as llama.cpp may call it


class LlamaCppBackend(Backend):
    name = "llama-cpp"

    require = staticmethod(require)

    def load(self, artifact: Path, kind: str = SINGLE_PASS) -> None:
        self.model = load(artifact, self.cfg.bench.threads)

    def run(self, input_ids: np.ndarray) -> np.ndarray:
        raise AntinetError("llama-cpp is benchmarked on generation only (bench-gen), not on single passes")

    def stepper(self) -> LlamaCppStepper:
        return LlamaCppStepper(self.model)

    def describe(self) -> dict:
        llama_cpp = require()
        return {"backend": self.name, "device": "cpu", "emulated": False, "threads": self.cfg.bench.threads,
                "llama_cpp_python": llama_cpp.__version__,
                "llama_cpp_system": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}


def load(path: Path, threads: int):
    """A llama.cpp model over its full trained context, one sequence, logits of the last position only."""
    llama_cpp = require()
    if not path.is_file():
        raise AntinetError(f"{path} not found: run `dvc repro export-gguf` first")
    try:
        return llama_cpp.Llama(str(path), n_ctx=0, n_batch=512, n_threads=threads or None,
                               n_threads_batch=threads or None, logits_all=False, verbose=False)
    except (ValueError, RuntimeError) as exc:  # llama-cpp-python raises ValueError("Failed to load model ...")
        raise AntinetError(f"llama.cpp cannot load {path} ({str(exc).splitlines()[0][:200]}): delete it and re-run "
                           "`dvc repro export-gguf`") from None


class LlamaCppStepper:
    """One llama.cpp context: `eval` appends tokens to its KV cache; rewinding drops the cache past a position."""

    def __init__(self, model):
        self.model = model
        self.context_length = model.n_ctx()

    @property
    def length(self) -> int:
        return self.model.n_tokens

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.model.reset()
        return self._append(prompt)

    def extend(self, tokens: np.ndarray) -> np.ndarray:
        return self._append(tokens)

    def decode(self, token: int) -> np.ndarray:
        return self._append(np.array([token]))

    def snapshot(self) -> Snapshot:
        """A position in the current context (no copy): valid until the next `prefill`."""
        return Snapshot(self.length, self.model, 0)

    def restore(self, snapshot: Snapshot) -> None:
        if snapshot.length > self.length:
            raise AntinetError("llama-cpp can only rewind its context: this snapshot is ahead of the cache; prefill "
                               "again")
        self.model.n_tokens = snapshot.length  # the next eval drops the cache from here on

    def _append(self, tokens: np.ndarray) -> np.ndarray:
        self.model.eval([int(t) for t in np.asarray(tokens).reshape(-1)])
        logits = self.model._ctx.get_logits()  # the last evaluated position's row
        return np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)),
                                     shape=(self.model.n_vocab(),)).copy()
