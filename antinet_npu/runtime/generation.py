"""Text generation over a KV cache, backend-neutral: prefill the prompt once, then decode one token at a time.

A backend that can generate hands out a session (`Stepper`: its own state, the cache and how many positions it
holds); `generate` drives it and picks tokens. Timing wraps the same calls (see `timing.GenerationTracker`). A session
can be saved and resumed (`snapshot` / `restore`, then `extend` with the rest of a prompt): a prompt that starts like
an earlier one need not pay for the shared prefix again.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.signature import Signature


@dataclass(frozen=True)
class Snapshot:
    """A session's cache after its first `length` positions: opaque to callers, never changed once taken."""

    length: int
    state: Any
    nbytes: int


def _nbytes(arrays) -> int:
    return int(sum(getattr(a, "nbytes", 0) for a in arrays))


class Stepper(Protocol):
    """A generation session over one loaded model."""

    context_length: int
    length: int  # positions in the cache

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        """Start over with `prompt` (P,) token ids -> float32 logits (vocab,) of its last position."""

    def extend(self, tokens: np.ndarray) -> np.ndarray:
        """Append `tokens` after the cached positions (the rest of a prompt after a restored prefix) -> the logits of
        the last one."""

    def decode(self, token: int) -> np.ndarray:
        """Append one token to the cache -> the logits of the next position."""

    def snapshot(self) -> Snapshot:
        """The cache as it is now."""

    def restore(self, snapshot: Snapshot) -> None:
        """Continue from `snapshot` (taken from this session)."""


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy (argmax). Otherwise softmax(logits / temperature), over the top_k best when top_k > 0."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None

    def picker(self):
        rng = np.random.default_rng(self.seed)

        def pick(logits: np.ndarray) -> int:
            if self.temperature <= 0:
                return int(np.argmax(logits))
            # shifted first: a tiny temperature sends the rest to -inf, never the best to +inf (NaN probabilities)
            logits = logits.astype(np.float64)
            with np.errstate(over="ignore"):
                scaled = (logits - logits.max()) / self.temperature
            if 0 < self.top_k < scaled.size:
                scaled[np.argpartition(scaled, -self.top_k)[:-self.top_k]] = -np.inf
            probs = np.exp(scaled - scaled.max())
            return int(rng.choice(scaled.size, p=probs / probs.sum()))

        return pick


def check_request(prompt_len: int, max_new_tokens: int, context_length: int) -> None:
    """One-line errors for a generation that cannot run."""
    if prompt_len <= 0:
        raise AntinetError("the prompt is empty: give at least one token of text")
    if max_new_tokens <= 0:
        raise AntinetError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if prompt_len + max_new_tokens > context_length:
        raise AntinetError(f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                           f"{context_length} positions: shorten the prompt or ask for fewer tokens")


def generate(stepper: Stepper, prompt: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
             sampling: Sampling = Sampling()) -> Iterator[int]:
    """Yield new tokens one by one; stops at an EOS token (not yielded) or after `max_new_tokens`."""
    prompt = np.asarray(prompt, dtype=np.int64).reshape(-1)
    check_request(prompt.size, max_new_tokens, stepper.context_length)
    pick = sampling.picker()
    logits = stepper.prefill(prompt)
    for step in range(max_new_tokens):
        token = pick(logits)
        if token in eos_ids:
            return
        yield token
        if step + 1 < max_new_tokens:
            logits = stepper.decode(token)


class OrtKvStepper:
    """An onnxruntime session over a KV-cache graph (see `signature.KvLayout`): the past it returns is fed back."""

    def __init__(self, session, signature: Signature):
        if signature.kv is None:
            raise AntinetError("this graph has no KV cache: it runs single passes only and cannot generate")
        self.session, self.signature, self.kv = session, signature, signature.kv
        self.context_length = signature.context_length
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.past, self.length = self.kv.empty(), 0
        return self.extend(prompt)

    def extend(self, tokens: np.ndarray) -> np.ndarray:
        if not self.past:
            self.past = self.kv.empty()
        return self._run(np.asarray(tokens, dtype=np.int64).reshape(1, -1))

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([[token]], dtype=np.int64))

    def snapshot(self) -> Snapshot:  # each call returns new arrays (never written in place): no copy needed
        return Snapshot(self.length, dict(self.past), _nbytes(self.past.values()))

    def restore(self, snapshot: Snapshot) -> None:
        self.past, self.length = dict(snapshot.state), snapshot.length

    def _run(self, ids: np.ndarray) -> np.ndarray:
        total = self.length + ids.shape[1]
        if total > self.context_length:
            raise AntinetError(f"{total} positions exceed the model's {self.context_length}")
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(self.length, total, dtype=np.int64)[None], **self.past}
        logits, *present = self.session.run(list(self.signature.outputs), feeds)
        self.past = dict(zip(self.kv.past_names(), present))
        self.length = total
        return logits[0, -1].astype(np.float32)


class RecomputeStepper:
    """No KV cache: every step runs the whole sequence again through a single-pass `run(ids) -> logits`."""

    def __init__(self, run, context_length: int):
        self.run, self.context_length = run, context_length
        self.ids = np.zeros((1, 0), np.int64)

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        self.ids = np.zeros((1, 0), np.int64)
        return self.extend(prompt)

    def extend(self, tokens: np.ndarray) -> np.ndarray:
        self.ids = np.concatenate([self.ids, np.asarray(tokens, dtype=np.int64).reshape(1, -1)], axis=1)
        return self.run(self.ids)[0, -1]

    def decode(self, token: int) -> np.ndarray:
        return self.extend(np.array([token]))

    def snapshot(self) -> Snapshot:  # nothing is cached: the prefix itself, re-run on every step
        return Snapshot(self.length, self.ids, self.ids.nbytes)

    def restore(self, snapshot: Snapshot) -> None:
        self.ids = snapshot.state


class CopiedStateMixin:
    """`snapshot` / `restore` for a session whose cache object is updated in place (transformers' DynamicCache):
    a deep copy each way."""

    past: Any
    length: int

    def snapshot(self) -> Snapshot:
        state = copy.deepcopy(self.past)
        tensors = [t for layer in getattr(state, "layers", []) for t in (getattr(layer, "keys", None),
                                                                           getattr(layer, "values", None))]
        return Snapshot(self.length, state, int(sum(t.numel() * t.element_size() for t in tensors
                                                    if t is not None)))

    def restore(self, snapshot: Snapshot) -> None:
        self.past, self.length = copy.deepcopy(snapshot.state), snapshot.length
