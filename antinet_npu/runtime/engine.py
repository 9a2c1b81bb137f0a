"""The model behind `serve`: `ModelHost` loads a run; `Engine` is the one thread that runs it.

Requests never touch the backend themselves: each becomes a `Job` in a bounded queue (full: the caller answers 429),
and the engine's thread runs jobs one at a time (backends such as the QNN HTP one are not built for concurrent runs,
and on one NPU, queueing is what would happen anyway). A job reports to its request through an asyncio queue, and
the request cancels it (client gone, stop string seen, server shutting down): the engine checks between two decode
steps, so a cancelled or expired job frees the model within one step. Generation starts from the prefix cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.config import Config
from antinet_npu.runtime import generation
from antinet_npu.runtime.prefix_cache import PrefixCache

log = logging.getLogger("serve")


class ModelHost:
    """The loaded model and what requests need to know of it, or why it is not there (yet)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.status = "loading"
        self.error: str | None = None
        self.info: dict[str, Any] = {"model": cfg.model.name, "run": cfg.serve.run}
        self.backend = None
        self.tokenizer = None
        self.max_tokens = 0
        self.vocab_size = 0
        self.stepper = None
        self.eos_ids: tuple[int, ...] = ()

    def load(self) -> None:
        try:
            from antinet_npu import artifacts
            from antinet_npu.build import checkpoint
            from antinet_npu.measure.provenance import versions
            from antinet_npu.runtime.backends.registry import open_run

            start = time.perf_counter()
            snapshot = artifacts.pytorch_dir(self.cfg.model.name)
            if not snapshot.is_dir():
                raise AntinetError(f"no prepared model at {snapshot}: run `dvc repro` first")
            self.tokenizer = checkpoint.load_tokenizer(snapshot)
            self.vocab_size = checkpoint.snapshot_config(snapshot)["vocab_size"]
            backend, how = open_run(self.cfg, self.cfg.serve.run)
            self.backend = backend
            kv_cache = True
            if getattr(backend, "timed_generate", None) is not None:  # samples for itself (Genie): no logits
                self.max_tokens = backend.context_length
                for _ in range(self.cfg.serve.warmup):
                    backend.timed_generate(np.zeros(8, np.int64), 2)
            else:
                self.max_tokens = backend.seq_len or getattr(backend, "context_length", None) or \
                    checkpoint.max_positions(checkpoint.snapshot_config(snapshot))
                probe = np.zeros((1, backend.seq_len or 8), dtype=np.int64)
                for _ in range(self.cfg.serve.warmup):
                    backend.run(probe)
                try:
                    self.stepper = backend.stepper()
                    self.max_tokens = min(self.max_tokens, self.stepper.context_length)
                except AntinetError:  # a static single-pass graph: generate by re-running the padded prefix
                    self.stepper = generation.RecomputeStepper(self._run_padded, self.max_tokens)
                    kv_cache = False
            self.eos_ids = tuple(i for i in (self.tokenizer.eos_token_id,) if i is not None)
            self.info.update(backend.describe(), **how, static_seq_len=backend.seq_len, max_tokens=self.max_tokens,
                             kv_cache=kv_cache, versions=versions())
            self.status = "ready"
            log.info("model ready in %.1f s: %s on %s (%s)%s", time.perf_counter() - start, self.cfg.serve.run,
                     self.info["backend"], self.info["device"], ", emulated" if self.info["emulated"] else "")
        except Exception as exc:  # any failure must surface as 503 + reason, never kill the server
            self.status, self.error = "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("loading failed: %s", self.error)

    @property
    def samples_itself(self) -> bool:
        """The runtime picks tokens with its own sampler (Genie: the bundle's, greedy); there are no logits here."""
        return self.stepper is None

    def _run_padded(self, ids: np.ndarray) -> np.ndarray:
        """(1, n) ids -> logits (1, n, vocab) on a static graph of S >= n tokens: padded on the right; with a causal
        mask, padding after position n-1 cannot change its logits."""
        n = ids.shape[1]
        row = np.full((1, self.backend.seq_len), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        row[0, :n] = ids[0]
        return self.backend.run(row)[:, :n]

    def check_request(self, ids: list[int], max_new_tokens: int) -> None:
        if not ids:
            raise AntinetError("the prompt is empty: give at least one token of text")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise AntinetError(f"token ids must be in 0..{self.vocab_size - 1}")
        if max_new_tokens > self.cfg.serve.max_new_tokens:
            raise AntinetError(f"max_new_tokens {max_new_tokens} is over the limit of {self.cfg.serve.max_new_tokens} "
                               "(serve.max_new_tokens)")
        if len(ids) + max_new_tokens > self.max_tokens:
            raise AntinetError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                               f"limit of {self.max_tokens} tokens: shorten the prompt or ask for fewer tokens")


# What a job sends its request, after any tokens (ints): exactly one of these, last.
@dataclass(frozen=True)
class Finished:
    reason: str                 # stop | length (a generation), done (other work); cancelled | timeout
    result: Any = None


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass(frozen=True)
class Started:
    """The job reached the model: how long it queued, how many prompt tokens came from the prefix cache."""
    queued_s: float
    cached_tokens: int = 0


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is busy: {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Job:
    work: Callable[[Job], Any]
    loop: asyncio.AbstractEventLoop
    deadline: float                                   # time.monotonic()
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    checked: float = field(default_factory=time.monotonic)  # when the request last looked for its client

    def emit(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def cancel(self) -> None:
        self.cancelled.set()

    def why_stop(self) -> str | None:
        if self.cancelled.is_set():
            return "cancelled"
        if time.monotonic() > self.deadline:
            return "timeout"
        return None


class Engine:
    """The thread that owns the model. `submit` queues work; `generate` / `exclusive` are what work runs."""

    def __init__(self, host: ModelHost, on_step: Callable[[float], None] | None = None,
                 on_idle: Callable[[Engine], None] | None = None):
        serve = host.cfg.serve
        self.host = host
        self.jobs: queue.Queue = queue.Queue(maxsize=serve.max_queue)
        self.cache = PrefixCache(int(serve.prefix_cache_mb * 2**20)) if serve.prefix_cache_mb > 0 else None
        self.on_step = on_step or (lambda seconds: None)   # each decode step's latency (monitoring)
        self.on_idle = on_idle                            # called about once a second with no work
        self.busy = False
        self.last_active = time.monotonic()
        self.job_seconds = 1.0  # running mean of a job's time at the model: what Retry-After is made of
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="model-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    def submit(self, work: Callable[[Job], Any], loop: asyncio.AbstractEventLoop, timeout_s: float) -> Job:
        if self._stopping:
            raise QueueFull(1)
        job = Job(work, loop, time.monotonic() + timeout_s)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(max(1, round(self.job_seconds * (self.depth + 1)))) from None
        return job

    def stop(self, wait_s: float) -> None:
        """Refuse new work, cancel what is queued, let the current job see its cancel, wait for the thread."""
        self._stopping = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.cancel()
            job.emit(Finished("cancelled"))
        with contextlib.suppress(queue.Full):
            self.jobs.put_nowait(None)
        self._thread.join(wait_s)

    def _loop(self) -> None:
        while not self._stopping:
            try:
                job = self.jobs.get(timeout=1.0)
            except queue.Empty:
                if self.on_idle is not None and self.host.status == "ready":
                    try:
                        self.on_idle(self)
                    except Exception as exc:  # the idle benchmark is optional: say why it failed, keep serving
                        log.warning("idle-time work failed: %s", exc)
                continue
            if job is None:
                break
            if (why := job.why_stop()) is not None:  # gone or expired while it queued: never reaches the model
                job.emit(Finished(why))
                continue
            self.busy, start = True, time.monotonic()
            try:
                job.emit(Finished(*job.work(job)))
            except BaseException as exc:  # the request reports it; the engine goes on
                if not isinstance(exc, AntinetError):
                    log.exception("request failed")
                job.emit(Failed(exc))
            finally:
                self.busy, self.last_active = False, time.monotonic()
                self.job_seconds = 0.8 * self.job_seconds + 0.2 * (time.monotonic() - start)

    # --- work, run on the engine's thread -------------------------------------------------------------------------

    def _start(self, ids: list[int]) -> tuple[np.ndarray, int]:
        """The logits after `ids`, resuming from the longest cached prefix: (logits, prompt tokens reused)."""
        stepper = self.host.stepper
        hit = self.cache.lookup(ids) if self.cache is not None else None
        if hit is None:
            logits = stepper.prefill(np.asarray(ids, dtype=np.int64))
        else:
            stepper.restore(hit.snapshot)
            logits = stepper.extend(np.asarray(ids[len(hit.tokens):], dtype=np.int64))
        self._remember(ids)
        return logits, len(hit.tokens) if hit else 0

    def _remember(self, held: list[int]) -> None:
        if self.cache is not None:
            self.cache.put(held, self.host.stepper.snapshot())

    def generate(self, job: Job, ids: list[int], max_new_tokens: int,
                 sampling: generation.Sampling) -> tuple[str, None]:
        """Emit new tokens one by one; returns the finish reason (stop: EOS, length, cancelled, timeout)."""
        if self.host.samples_itself:
            return self._generate_itself(job, ids, max_new_tokens), None
        queued = time.monotonic() - job.enqueued
        logits, cached = self._start(ids)
        job.emit(Started(queued, cached))
        pick = sampling.picker()
        held = list(ids)
        try:
            for step in range(max_new_tokens):
                token = pick(logits)
                if token in self.host.eos_ids:
                    return "stop", None
                job.emit(token)
                if step + 1 == max_new_tokens:
                    return "length", None
                if (why := job.why_stop()) is not None:
                    return why, None
                begin = time.perf_counter()
                logits = self.host.stepper.decode(token)
                self.on_step(time.perf_counter() - begin)
                held.append(token)
        finally:
            if len(held) > len(ids):  # the session now holds the answer too: the next chat turn resends it
                self._remember(held)
        return "length", None

    def _generate_itself(self, job: Job, ids: list[int], max_new_tokens: int) -> str:
        """Genie samples inside its own query and calls back per token: run the query in a helper thread, abort it
        when the job stops, and wait for it before the model is free again."""
        job.emit(Started(time.monotonic() - job.enqueued))
        tokens: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []
        dialog = self.host.backend.dialog

        def produce():
            try:
                dialog.generate(ids, max_new_tokens, on_token=tokens.put)
            except BaseException as exc:  # reported below
                failure.append(exc)
            finally:
                tokens.put(done)

        worker = threading.Thread(target=produce, name="genie-query", daemon=True)
        worker.start()
        count, reason = 0, "stop"
        last = time.perf_counter()
        try:
            while True:
                if (why := job.why_stop()) is not None:
                    reason = why
                    break
                try:
                    token = tokens.get(timeout=0.05)
                except queue.Empty:
                    continue
                if token is done:
                    break
                if token in self.host.eos_ids:
                    break
                now = time.perf_counter()
                if count:
                    self.on_step(now - last)
                last, count = now, count + 1
                job.emit(token)
            if failure:
                raise failure[0]
        finally:
            if worker.is_alive():
                dialog.abort()
                worker.join()
        return "length" if reason == "stop" and count == max_new_tokens else reason

    def infer(self, job: Job, ids: list[int], top_k: int, max_new_tokens: int) -> tuple[str, dict]:
        """Next-token log-probabilities after `ids` and a greedy continuation through the same session."""
        queued, start = time.monotonic() - job.enqueued, time.perf_counter()
        logits, cached = self._start(ids)
        job.emit(Started(queued, cached))
        first_ms = (time.perf_counter() - start) * 1000
        logits = logits.astype(np.float64)
        generated, current = [], logits
        for _ in range(max_new_tokens):
            generated.append(int(np.argmax(current)))
            if len(generated) == max_new_tokens or job.why_stop():
                break
            current = self.host.stepper.decode(generated[-1])
        if len(generated) > 1:
            self._remember(ids + generated[:-1])
        if job.why_stop():
            return job.why_stop(), None
        logp = logits - logits.max()
        logp = logp - np.log(np.exp(logp).sum())
        top = np.argsort(-logp)[:top_k]
        return "done", {"top": [(int(t), float(logp[t])) for t in top], "generated": generated,
                        "first_ms": first_ms, "cached_tokens": cached}

    def benchmark(self, job: Job, lengths: list[int], warmup: int, iterations: int) -> tuple[str, list]:
        from antinet_npu.measure.timing import LatencyTracker

        job.emit(Started(time.monotonic() - job.enqueued))
        rng = np.random.default_rng(0)
        results = []
        for n in lengths:
            ids = rng.integers(0, self.host.vocab_size, (1, n)).astype(np.int64)
            tracker = LatencyTracker()
            for _ in range(warmup):
                self.host.backend.run(ids)
            for _ in range(iterations):
                if job.why_stop():
                    return job.why_stop(), None
                with tracker.track():
                    self.host.backend.run(ids)
            results.append((n, tracker))
        return "done", results
