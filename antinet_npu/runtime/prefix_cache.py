"""The server's prefix (input) cache: generation-session snapshots keyed by the tokens they hold, bounded in bytes,
least recently used first out. A new prompt resumes from the longest cached sequence that is a strict prefix of it
(a system prompt, a chat history resent with one more turn) and pays only for the rest."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from antinet_npu.runtime.generation import Snapshot


@dataclass(frozen=True)
class Hit:
    tokens: tuple[int, ...]
    snapshot: Snapshot


class PrefixCache:
    def __init__(self, max_bytes: int, max_entries: int = 64):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int]) -> Hit | None:
        """The longest cached sequence that is a strict prefix of `ids` (at least one token must remain to run, for
        the logits of the last position)."""
        best = None
        for tokens in self._entries:
            if len(tokens) < len(ids) and (best is None or len(tokens) > len(best)) and \
                    tuple(ids[:len(tokens)]) == tokens:
                best = tokens
        if best is None:
            return None
        self._entries.move_to_end(best)
        return Hit(best, self._entries[best])

    def put(self, tokens: list[int], snapshot: Snapshot) -> None:
        key = tuple(tokens)
        if snapshot.length != len(key) or snapshot.nbytes > self.max_bytes:
            return  # a snapshot larger than the whole cache is not kept (nor one that does not match its tokens)
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        self._entries[key] = snapshot
        self.nbytes += snapshot.nbytes
        while self.nbytes > self.max_bytes or len(self._entries) > self.max_entries:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
