"""Text for training the builtin model, calibrating quantizers and measuring fidelity.

Documents come from a configurable source and are split once, by a stable hash of their id, into `train`, `calib`
and `eval`; evaluation never sees a calibration or training document.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.config import BUILTIN_PREFIX, TextConfig

BUILTIN_STDLIB = "builtin:stdlib-docstrings"
# Pure-Python standard-library modules with plenty of prose in their docstrings. Fixed list, fixed order:
# the builtin corpus is the same on every machine with the same Python version.
STDLIB_MODULES = (
    "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.tasks",
    "base64", "bdb", "bisect", "calendar", "cmd", "codecs", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message",
    "email.utils", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "http.server",
    "imaplib", "inspect", "ipaddress", "json", "logging", "logging.handlers", "mailbox", "mimetypes",
    "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "queue", "quopri",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "trace", "traceback", "types", "typing", "unittest.case", "unittest.mock", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "wave", "xml.dom.minidom", "zipfile",
)
MIN_DOC_CHARS = 80
SPLITS = ("train", "calib", "eval")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def load_documents(source: str) -> list[Document]:
    """All documents of a text source, in a deterministic order."""
    if source == BUILTIN_STDLIB:
        docs = _stdlib_docstrings()
    elif source.startswith(BUILTIN_PREFIX):
        raise AntinetError(f"unknown builtin text source {source!r}: use {BUILTIN_STDLIB} or a local file/folder")
    else:
        docs = _local_documents(Path(source).expanduser())
    if not docs:
        raise AntinetError(f"text source {source!r} holds no text: point text.source at .txt/.md files with content")
    return docs


def split_documents(cfg: TextConfig) -> dict[str, list[Document]]:
    """Documents of `cfg.source` by split. The split depends only on each document's id."""
    splits: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc in load_documents(cfg.source):
        u = int.from_bytes(hashlib.sha256(doc.id.encode()).digest()[:8], "big") / 2**64
        name = "eval" if u < cfg.eval_fraction else "calib" if u < cfg.eval_fraction + cfg.calib_fraction else "train"
        splits[name].append(doc)
    for name, docs in splits.items():
        if not docs:
            raise AntinetError(f"text source {cfg.source!r} has no documents left for the {name} split: add more "
                               "documents (files, or paragraphs separated by blank lines)")
    return splits


def token_stream(tokenizer, docs: list[Document]) -> np.ndarray:
    """All documents tokenized and joined with the end-of-text token, as one int64 array."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def windows(tokenizer, docs: list[Document], seq_len: int, count: int, what: str) -> np.ndarray:
    """`count` non-overlapping windows of `seq_len` tokens, shape (count, seq_len), from the start of `docs`."""
    if seq_len < 1 or count < 0:
        raise AntinetError(f"{what} windows need a length >= 1 and a count >= 0, got {seq_len} and {count}")
    stream = token_stream(tokenizer, docs)
    available = len(stream) // seq_len
    if available < count:
        raise AntinetError(f"the {what} text has {len(stream)} tokens, enough for {available} windows of {seq_len} "
                           f"but {count} are needed: lower the sample count or length, or add text to text.source")
    return stream[: count * seq_len].reshape(count, seq_len)


def generation_prompts(tokenizer, docs: list[Document], length: int, count: int) -> np.ndarray:
    """Held-out prompts for greedy-continuation checks (evaluate, export-genai): the evaluation text read from its
    other end, so that they differ from the evaluation windows. Shape (count, length)."""
    if not count:
        return np.zeros((0, length), np.int64)
    return windows(tokenizer, docs[::-1], length, count, "evaluation")


def _local_documents(path: Path) -> list[Document]:
    if not path.exists():
        raise AntinetError(f"text source {str(path)!r} does not exist: point text.source at a .txt/.md file or "
                           f"folder, or use {BUILTIN_STDLIB}")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md")) if path.is_dir() else [path]
    docs = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise AntinetError(f"cannot read text file {file}: {exc}; text sources must be UTF-8") from None
        # Paragraphs (blank-line separated) are documents, so one big file still splits into train/calib/eval.
        for i, para in enumerate(p.strip() for p in text.split("\n\n")):
            if para:
                docs.append(Document(f"{file.relative_to(path) if path.is_dir() else file.name}#{i}", para))
    return docs


def _stdlib_docstrings() -> list[Document]:
    docs: dict[str, str] = {}
    seen: set[str] = set()
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a module a minimal Python build lacks: skip it, the rest still make a corpus
            continue
        items = [(name, module)]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            items.append((f"{name}.{attr}", obj))
            if inspect.isclass(obj):
                # Only the class's own methods: other libraries patch stdlib classes (transformers adds
                # logging.Logger.warning_once), which would make the corpus depend on what was imported first.
                items += [(f"{name}.{attr}.{m}", v) for m, v in sorted(vars(obj).items())
                          if not m.startswith("_") and callable(v)
                          and getattr(v, "__module__", module.__name__) == module.__name__]
        for doc_id, obj in items:
            text = inspect.getdoc(obj)
            if text and len(text) >= MIN_DOC_CHARS and text not in seen:
                docs[doc_id] = text
                seen.add(text)
    return [Document(i, t) for i, t in docs.items()]
