"""Where a model comes from: the builtin Qwen2 (built and briefly trained here), a local directory, or a hub id.

Everything returns a float32 `PreTrainedModel` in eval mode plus its tokenizer; `load_snapshot` reads back what the
`prepare` stage saved, which is what every later stage starts from.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.build.corpus import Document, token_stream
from antinet_npu.config import BuiltinModelConfig, ModelConfig

log = logging.getLogger(__name__)
EOS_TOKEN = "<|endoftext|>"
# What a Hugging Face checkpoint folder holds its tokenizer in (fast tokenizer, SentencePiece, byte-level BPE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_source(cfg: ModelConfig, train_docs: list[Document] | None = None):
    """(model, tokenizer, info) for `cfg.source`; `train_docs` feed the builtin model's tokenizer and training."""
    if cfg.is_builtin:
        assert cfg.builtin is not None and train_docs is not None
        return build_builtin(cfg.builtin, train_docs)
    path = Path(cfg.source).expanduser()
    # A hub id is `name` or `org/name`; anything else that is not an existing folder is meant as a path.
    if path.exists() or cfg.source.startswith(("/", ".", "~")) or cfg.source.count("/") > 1 or "\\" in cfg.source:
        return _load_local(path, cfg)
    return _load_hub(cfg)


def load_snapshot(path: str | Path, attn_implementation: str = "eager", only: Callable[[str], bool] | None = None):
    """The model saved by `prepare`, float32, eval mode.

    With `only`, just the weights whose names it selects are read (the rest stay on the meta device, taking no
    memory): one generation part of Qwen2-1.5B is 1.3-2.2 GB of its 6.2 GB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AntinetError(f"no prepared model at {path}: run `dvc repro prepare` (or `antinet-npu prepare`) first")
    if only is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
        return model.eval()
    from safetensors import safe_open

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            state.update({name: weights.get_tensor(name).float() for name in weights.keys() if only(name)})
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and "model.embed_tokens.weight" in state:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers computed at construction (the rotary tables) are on the meta device too: build them for real
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def snapshot_config(path: str | Path) -> dict:
    """config.json of a prepared snapshot, read as plain JSON (no transformers import)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise AntinetError(f"no prepared model at {path}: run `dvc repro prepare` (or `antinet-npu prepare`) first")
    return json.loads(file.read_text())


def load_tokenizer(path: str | Path):
    """The full transformers tokenizer (encode and decode); imports torch, so stages that only need token ids use
    `load_text_tokenizer`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path))


class TextTokenizer:
    """Text -> token ids straight from `tokenizer.json` (the `tokenizers` library; no torch, no transformers).

    Same ids as the transformers fast tokenizer with add_special_tokens=False, which is all the corpus needs.
    """

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        eos = json.loads((path / "tokenizer_config.json").read_text()).get("eos_token") \
            if (path / "tokenizer_config.json").is_file() else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_token_id = self._tok.token_to_id(eos) if eos else None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}


def load_text_tokenizer(path: str | Path):
    """A light tokenizer for turning text into ids; falls back to transformers when there is no tokenizer.json."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        if not (path / "config.json").is_file():
            raise AntinetError(f"no prepared model at {path}: run `dvc repro prepare` (or `antinet-npu prepare`) first")
        return load_tokenizer(path)
    return TextTokenizer(path)


def check_seq_len(seq_len: int, limit: int, where: str) -> None:
    if seq_len < 2:
        raise AntinetError(f"sequence length must be at least 2, got {seq_len}: {where}")
    if seq_len > limit:
        raise AntinetError(f"sequence length {seq_len} exceeds the model's maximum positions ({limit}): {where}")

def max_positions(model_config) -> int:
    """Longest sequence the model's position encoding was configured for (a config object or its dict)."""
    get = model_config.get if isinstance(model_config, dict) else lambda k, d=None: getattr(model_config, k, d)
    return int(get("max_position_embeddings", 0) or 0) or 2**31 - 1


# --- builtin -----------------------------------------------------------------------------------------------------

def build_builtin(spec: BuiltinModelConfig, train_docs: list[Document]):
    """A seeded Qwen2ForCausalLM with an offline BPE tokenizer, trained for `spec.train_steps` steps."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_tokenizer(train_docs, spec.tokenizer_vocab_size)
    config = Qwen2Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings, rope_theta=spec.rope_theta,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
    info = {"num_parameters": sum(p.numel() for p in model.parameters())}
    if spec.train_steps:
        # One thread: a parallel reduction's rounding depends on how the work was split, and a retrained model that
        # differs in its last bits makes every downstream stage stale (seen once in the tests, under load).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            info["train_loss"] = _train(model, token_stream(tokenizer, train_docs), spec)
        finally:
            torch.set_num_threads(threads)
    return model.eval(), tokenizer, info


def train_tokenizer(docs: list[Document], vocab_size: int):
    """Byte-level BPE trained on `docs` (deterministic for the same documents), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Parallel BPE training breaks ties between equally frequent merges in thread order: two runs of `dvc repro`
    # trained different merge orders. Single-threaded training is deterministic (and takes under a second here).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([d.text for d in docs], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   model_max_length=2**31 - 1)


def _train(model, stream: np.ndarray, spec: BuiltinModelConfig) -> float:
    """Next-token training on random windows of `stream`; returns the mean loss of the last 10% of steps."""
    import torch

    seq = spec.train_seq_len + 1
    if len(stream) < seq * 2:
        raise AntinetError(f"the training text has only {len(stream)} tokens: add text or lower "
                           "model.builtin.train_seq_len")
    rng = np.random.default_rng(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    warmup = max(1, spec.train_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, spec.train_steps) /
                                                                          spec.train_steps)))
    model.train()
    tail: list[float] = []
    for step in range(spec.train_steps):
        starts = rng.integers(0, len(stream) - seq, size=spec.train_batch_size)
        batch = torch.from_numpy(np.stack([stream[s:s + seq] for s in starts]))
        loss = _lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= spec.train_steps * 0.9:
            tail.append(loss.item())
        if step % max(1, spec.train_steps // 10) == 0 or step == spec.train_steps - 1:
            log.info("train step %d/%d loss %.3f", step + 1, spec.train_steps, loss.item())
    model.eval()
    return float(np.mean(tail))


def _lm_loss(model, batch):
    import torch

    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


# --- local directory and hub -------------------------------------------------------------------------------------

def _load_local(path: Path, cfg: ModelConfig):
    if not path.is_dir():
        if cfg.fetch_hint:
            raise AntinetError(f"model {cfg.name}: no checkpoint at {str(path)!r}: {cfg.fetch_hint}")
        raise AntinetError(f"model.source {str(path)!r} is not a directory: point model.source at a local "
                           "Hugging Face checkpoint directory, a hub id, or builtin:tiny-qwen2")
    if not (path / "config.json").is_file():
        raise AntinetError(f"{path} has no config.json: point model.source at a Hugging Face checkpoint directory "
                           "(the folder save_pretrained wrote)")
    return _from_pretrained(str(path), cfg, local_only=True)


def _load_hub(cfg: ModelConfig):
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()
    return _from_pretrained(cfg.source, cfg, local_only=offline)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub: without it, the local cache only (transformers would retry for ~25 s)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(where: str, cfg: ModelConfig, local_only: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, local_files_only=local_only)
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(where).is_dir():
            raise AntinetError(f"cannot read the config in {where}: {_first_line(exc)}") from None
        raise AntinetError(
            f"model.source {where!r} is not in the local Hugging Face cache and the hub is unreachable: download it "
            f"where there is network (`hf download {where}`) or point model.source at a local directory") from None
    if type(config) not in AutoModelForCausalLM._model_mapping and not cfg.trust_remote_code:
        raise AntinetError(f"{where} is a {config.model_type!r} model, not a causal LM: antinet-npu converts "
                           "decoder-only checkpoints (Qwen2, Llama, ...) loadable with AutoModelForCausalLM")
    log.info("loading %s", where)
    local = Path(where).is_dir()
    if local and not any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
        raise AntinetError(f"{where} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer "
                           "files of the model's repository into it")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, attn_implementation="eager",
                                                     **kwargs)
    except Exception as exc:  # OSError, ValueError, safetensors' SafetensorError on a truncated file, ...
        what = "the weights in " if local else ""
        raise AntinetError(f"cannot load {what}{where} ({type(exc).__name__}: {_first_line(exc)}): the checkpoint "
                           "is damaged or incomplete; copy or download it again") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise AntinetError(f"cannot load the tokenizer of {where}: {_first_line(exc)}") from None
    if len(tokenizer) < 2:
        raise AntinetError(f"the tokenizer of {where} has {len(tokenizer)} token(s): its files are incomplete; copy "
                           "the tokenizer files of the model's repository into it")
    return model.eval(), tokenizer, {"num_parameters": sum(p.numel() for p in model.parameters())}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor progress bars drown the stage's own progress lines


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(model) -> dict:
    """Architecture facts worth recording next to metrics."""
    c = model.config
    return {"model_type": c.model_type, "num_hidden_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size, "max_position_embeddings": max_positions(c)}
