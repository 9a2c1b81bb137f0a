"""Static generation graphs for the NPU and the host loop that runs them.

HTP runs static shapes only, so generation takes two graphs per part of the model, as Qualcomm AI Hub builds them:
AR-N (N prompt tokens per call) and AR-1 (one token), both over a fixed context CL. A part holds the embedding and/or
a range of decoder layers and/or the final norm and lm_head, so that each graph stays under HTP's per-graph limit.

The graphs' I/O is AI Hub's, which is what Qualcomm's LLM runtime Genie runs (`genie`), so one contract serves the
host loop here, the QNN EP, AppBuilder and Genie. Per call, a part takes `input_ids` (1, AR) int32 (first part) or
the residual stream `hidden_states_<layer>` (1, AR, hidden), named alike on both sides of a cut; an additive float
mask (1, 1, AR, CL) over [CL - AR past slots | AR new slots]; the rotary tables `position_ids_cos` / `_sin`
(1, 1, AR, head_dim / 2); per layer l `past_key_{l}_in` (kv_heads, 1, head_dim, CL - AR), keys transposed, and
`past_value_{l}_in` (kv_heads, 1, CL - AR, head_dim). It gives `logits` (1, AR, vocab) (last part) or the next
part's `hidden_states_<layer>`, and only the AR new entries `past_key_{l}_out` (kv_heads, 1, head_dim, AR) /
`past_value_{l}_out` (kv_heads, 1, AR, head_dim).

The host loop (`StaticStepper`) fills the cache as Genie does: from slot 0, new tokens in the last AR slots, a short
prompt chunk padded on the right, empty slots hidden by the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.runtime.generation import Snapshot
from antinet_npu.signature import Part, Signature


def check_built_for(path, signature: Signature, prefill_len: int, context_length: int, parts: int,
                    stage: str) -> None:
    """A part graph must be the one compile.generation asks for (AR, context, number of parts)."""
    ar = 1 if signature.seq_len == 1 else prefill_len
    if signature.part is None or (signature.seq_len, signature.context_length, signature.part.count) != \
            (ar, context_length, parts):
        built = f"AR-{signature.seq_len}, context {signature.context_length}, " \
                f"{signature.part.count if signature.part else 1} parts"
        raise AntinetError(f"{path} was built for {built}, not what compile.generation asks (AR-{ar}, context "
                           f"{context_length}, {parts} parts): re-run `dvc repro {stage}`")


def plan_parts(num_layers: int, parts: int) -> list[Part]:
    """Split `num_layers` decoder layers into `parts` contiguous ranges as even as possible (earlier parts take the
    extra layer; the first part also holds the embedding, the last the lm_head)."""
    if not 1 <= parts <= num_layers:
        raise AntinetError(f"the model has {num_layers} decoder layers: compile.generation.parts must be 1.."
                           f"{num_layers}, got {parts}")
    sizes = [num_layers // parts + (i < num_layers % parts) for i in range(parts)]
    starts = np.cumsum([0, *sizes[:-1]])
    return [Part(i, parts, int(s), n) for i, (s, n) in enumerate(zip(starts, sizes))]


class StaticStepper:
    """Generation over static AR-N / AR-1 part graphs (`generation.Stepper`).

    `signatures`: the AR-N graphs' signatures, one per part in order. `prefill` / `decode`: one callable per part,
    feeds -> outputs (in `Part.output_names` order), running the AR-N and the AR-1 graph. The prompt runs N tokens
    per call, its last chunk padded on the right; every new key/value of a real token is kept, and a call sees the
    cache in its first past slots (Genie's layout)."""

    def __init__(self, signatures: Sequence[Signature], prefill: Sequence[Callable], decode: Sequence[Callable]):
        first = signatures[0]
        if first.part is None or first.rope is None or first.kv is None or first.seq_len is None:
            raise AntinetError("these graphs are not static generation parts: re-run `dvc repro export-npu-gen`")
        self.parts = [s.part for s in signatures]
        self.prefill_len, self.context_length = first.seq_len, first.context_length
        self.graphs = {self.prefill_len: list(prefill), 1: list(decode)}
        self.kv, self.rope, self.mask_value = first.kv, first.rope, first.mask_value
        self.keys: dict[int, np.ndarray] = {}
        self.values: dict[int, np.ndarray] = {}
        self.length = 0

    def prefill(self, prompt: np.ndarray) -> np.ndarray:
        return self.score(prompt)[-1]

    def extend(self, tokens: np.ndarray) -> np.ndarray:
        return self.score(tokens, start_over=False)[-1]

    def score(self, prompt: np.ndarray, start_over: bool = True) -> np.ndarray:
        """Prefill `prompt` (after the cached positions unless `start_over`) and return the logits of each of its
        positions, (P, vocab)."""
        prompt = np.asarray(prompt, np.int64).reshape(-1)
        ar = self.prefill_len
        pad = (-prompt.size) % ar
        if start_over or not self.keys:
            layers = [layer for p in self.parts for layer in p.layers]
            self.keys = {layer: np.zeros(self.kv.part_shape("key", 0), np.float32) for layer in layers}
            self.values = {layer: np.zeros(self.kv.part_shape("value", 0), np.float32) for layer in layers}
            self.length = 0
        if self.length + prompt.size + pad > self.context_length:
            raise AntinetError(f"a prompt of {prompt.size} tokens after {self.length} cached takes "
                               f"{self.length + prompt.size + pad} positions in AR-{ar} chunks; the context holds "
                               f"{self.context_length} (compile.generation.context_length)")
        padded = np.concatenate([prompt, np.zeros(pad, np.int64)])
        real = np.concatenate([np.ones(prompt.size, bool), np.zeros(pad, bool)])
        chunks = [self._run(padded[i:i + ar], real[i:i + ar]) for i in range(0, padded.size, ar)]
        return np.concatenate(chunks)[:prompt.size]

    def snapshot(self) -> Snapshot:
        """The cache after the last call (its arrays are replaced, never written in place, so no copy is needed)."""
        return Snapshot(self.length, (dict(self.keys), dict(self.values)),
                        int(sum(a.nbytes for a in (*self.keys.values(), *self.values.values()))))

    def restore(self, snapshot: Snapshot) -> None:
        keys, values = snapshot.state
        self.keys, self.values, self.length = dict(keys), dict(values), snapshot.length

    def decode(self, token: int) -> np.ndarray:
        return self._run(np.array([token], np.int64), np.ones(1, bool))[-1]

    def _run(self, ids: np.ndarray, real: np.ndarray) -> np.ndarray:
        """One call of the AR-`ids.size` graphs: the logits of its AR positions; the cache gains the real ones."""
        ar = ids.size
        past_len = self.context_length - ar
        if self.length > past_len:
            raise AntinetError(f"{self.length} cached positions exceed the {past_len} past slots of the AR-{ar} "
                               f"graph (context {self.context_length}): shorten the prompt or max_new_tokens")
        cos, sin = self.rope.tables(self.length + np.arange(ar))
        feeds = {"attention_mask": self._mask(real, past_len), "position_ids_cos": cos, "position_ids_sin": sin}
        x = ids.astype(np.int32)[None]
        for part, graph in zip(self.parts, self.graphs[ar]):
            part_feeds = {part.input_names()[0]: x, **feeds}
            for layer in part.layers:
                part_feeds[f"past_key_{layer}_in"] = self._slots(self.keys[layer], "key", past_len)
                part_feeds[f"past_value_{layer}_in"] = self._slots(self.values[layer], "value", past_len)
            out = dict(zip(part.output_names(), graph(part_feeds)))
            x = out[part.output_names()[0]]
            for layer in part.layers:  # keep the real tokens' new entries
                self.keys[layer] = np.concatenate([self.keys[layer], out[f"past_key_{layer}_out"][..., real]], -1)
                self.values[layer] = np.concatenate([self.values[layer], out[f"past_value_{layer}_out"][:, :, real]],
                                                    2)
        self.length += int(real.sum())
        return np.asarray(x[0], np.float32)

    def _slots(self, cache: np.ndarray, kind: str, past_len: int) -> np.ndarray:
        slots = np.zeros(self.kv.part_shape(kind, past_len), np.float32)
        filled = _past_slice(kind, self.length)
        slots[filled] = cache
        return slots

    def _mask(self, real: np.ndarray, past_len: int) -> np.ndarray:
        """(1, 1, AR, CL): a query sees the filled past slots, and the new real tokens up to itself."""
        ar = real.size
        mask = np.full((ar, past_len + ar), self.mask_value, np.float32)
        mask[:, :self.length] = 0.0
        visible = np.tril(np.ones((ar, ar), bool)) & real[None, :]
        visible |= np.eye(ar, dtype=bool)  # a padding row sees itself: no row is all masked (its output is dropped)
        mask[:, past_len:][visible] = 0.0
        return mask[None, None]


def _past_slice(kind: str, length: int) -> tuple:
    """The first `length` slots of a part's cache tensor: the keys' last axis, the values' third."""
    return (..., slice(0, length)) if kind == "key" else (slice(None), slice(None), slice(0, length))


@dataclass
class Trace:
    """One call's feeds, kept small: the past key/value inputs without their empty slots. At a long context most
    slots are empty (a 7-layer Qwen2-1.5B part at CL 4096: 59 MB of past per AR-1 call, ~3 MB of it filled after a
    200-token prompt), and calibration keeps every call of every prompt."""

    feeds: dict[str, np.ndarray]
    past_len: int

    @classmethod
    def of(cls, feeds: dict[str, np.ndarray]) -> Trace:
        mask = feeds["attention_mask"]
        past_len = mask.shape[-1] - mask.shape[-2]
        filled = int((mask[0, 0, 0, :past_len] == 0).sum())  # the first query sees every filled slot (the first ones)
        return cls({k: v[_past_slice(_past_kind(k), filled)].copy() if _past_kind(k) else v
                    for k, v in feeds.items()}, past_len)

    def full(self) -> dict[str, np.ndarray]:
        out = dict(self.feeds)
        for name, kept in self.feeds.items():
            kind = _past_kind(name)
            if kind:
                filled = kept.shape[-1] if kind == "key" else kept.shape[2]
                shape = (*kept.shape[:3], self.past_len) if kind == "key" else (*kept.shape[:2], self.past_len,
                                                                                  kept.shape[3])
                out[name] = np.zeros(shape, kept.dtype)
                out[name][_past_slice(kind, filled)] = kept
        return out


def _past_kind(name: str) -> str | None:
    """"key" / "value" for a past cache input (`past_key_3_in`), None for any other input."""
    if name.startswith("past_") and name.endswith("_in"):
        return name.split("_")[1]
    return None


class SessionCache:
    """Sessions over static graphs, opened by `open_graph(path)` on first use and kept; but only the graphs of one
    shape (tokens per call) stay open: opening an AR-1 graph closes the AR-N ones and the other way round. A part's
    two graphs hold the same weights, and both sets at once do not fit: at Qwen2-1.5B, 8 FP32 CPU sessions (~14 GB)
    exceed a stage's 12 GB, and on the HTP emulator the sixth of eight unshared contexts failed with
    QNN_COMMON_ERROR_MEM_ALLOC (the NPU gives a process a few GB, as a device does)."""

    def __init__(self, open_graph: Callable):
        self.open_graph = open_graph
        self._open: dict[str, tuple[int, object]] = {}

    def __call__(self, path):
        key = str(path)
        if key not in self._open:
            tokens = Signature.read(path).seq_len
            for other in [k for k, (t, _) in self._open.items() if t != tokens]:
                del self._open[other]
            self._open[key] = (tokens, self.open_graph(path))
        return self._open[key][1]

    def close(self) -> None:
        self._open.clear()


def quantized_edges(signature: Signature, run: Callable) -> Callable:
    """`run` (feeds -> outputs, in `signature.outputs` order) over a graph with integer I/O, as a float one: the host
    quantizes what goes in and dequantizes what comes out with the graph's own encodings (round half to even, as
    QuantizeLinear). The cache goes back in with the encoding it came out with, so its round trip is exact."""
    encodings = signature.quantized_io
    if not encodings:
        return run

    def quantize(name: str, x: np.ndarray) -> np.ndarray:
        e = encodings.get(name)
        if e is None:
            return x
        info = np.iinfo(e["dtype"])
        return np.clip(np.rint(x / e["scale"]) + e["zero_point"], info.min, info.max).astype(e["dtype"])

    def dequantize(name: str, q: np.ndarray) -> np.ndarray:
        e = encodings.get(name)
        return q if e is None else ((q.astype(np.float32) - e["zero_point"]) * np.float32(e["scale"]))

    def runner(feeds: dict) -> list:
        outputs = run({name: quantize(name, x) for name, x in feeds.items()})
        return [dequantize(name, y) for name, y in zip(signature.outputs, outputs)]

    return runner


def open_parts(sources: dict[int, list], open_graph: Callable, record_into: dict | None = None) -> StaticStepper:
    """The host loop over part graphs: `sources[ar]` their paths in part order (AR-N and AR-1), `open_graph(path)` a
    session with `run(None, feeds)` (or a `SessionCache` of them, shared with the caller). With `record_into`,
    every call's feeds are kept under (ar, part index) as `Trace`s (calibration).

    Sessions open on first use, one AR's at a time (`SessionCache`): generation switches twice per prompt (prefill,
    then decode); `trace_generation` twice in all."""
    prefill_len = max(sources)
    session = open_graph if isinstance(open_graph, SessionCache) else SessionCache(open_graph)

    def runner(path, key):
        run = quantized_edges(Signature.read(path), lambda feeds: session(path).run(None, feeds))
        if record_into is None:
            return run
        return lambda feeds: (record_into.setdefault(key, []).append(Trace.of(feeds)), run(feeds))[1]

    graphs = {ar: [runner(p, (ar, i)) for i, p in enumerate(paths)] for ar, paths in sources.items()}
    return StaticStepper([Signature.read(p) for p in sources[prefill_len]], graphs[prefill_len], graphs[1])


def trace_generation(stepper: StaticStepper, prompts: Sequence[np.ndarray], new_tokens: int) -> None:
    """Greedy generation of `new_tokens` tokens from each prompt, as `generation.generate` does it (no EOS stop),
    but every prompt's prefill first, then every prompt's decode: two session switches in all (see `open_parts`)."""
    started = []
    for prompt in prompts:
        token = int(np.argmax(stepper.prefill(prompt)))
        started.append((stepper.snapshot(), token))
    for state, token in started:
        stepper.restore(state)
        for _ in range(new_tokens - 1):
            token = int(np.argmax(stepper.decode(token)))
