"""`antinet-npu serve`: an HTTP API on one loaded model (FastAPI + uvicorn, the `serve` extra).

The server answers at once; the model loads in a background thread (tokenizer, backend through the bench fallback
chain, warm-up). Until then, and if loading failed, model endpoints return 503 with the reason. One request runs
the model at a time (a lock serializes them, a streamed generation holds it to the end): backends such as the QNN
HTP one are not built for concurrent runs, and on one NPU, queueing is what would happen anyway.

Generation goes through the backend's KV cache (`generation.Stepper`); a static single-pass graph (the NPU context
binaries today) has none, so it re-runs the padded prefix for every token, and says so (`kv_cache: false`).
`/v1/completions` and `/v1/chat/completions` speak OpenAI's protocol (server-sent events when `stream` is true).
"""

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal, Optional, Union

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.config import Config
from antinet_npu.runtime import generation

log = logging.getLogger("serve")


class ModelHost:
    """The loaded model and everything requests need, or why it is not there (yet)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.status = "loading"
        self.error: str | None = None
        self.info: dict[str, Any] = {"model": cfg.model.name, "run": cfg.serve.run}
        self.lock = threading.Lock()
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

    def _tokens(self, ids: list[int], max_new_tokens: int, sampling: generation.Sampling) -> Iterator[int]:
        if not self.samples_itself:
            yield from generation.generate(self.stepper, ids, max_new_tokens, self.eos_ids, sampling)
            return
        # Genie calls back from inside its query: run it in a thread, hand tokens over a queue; a consumer that
        # stops early (stop string, disconnect) aborts the query and waits for it before the lock is released
        import queue

        tokens: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def produce():
            try:
                self.backend.dialog.generate(ids, max_new_tokens, on_token=tokens.put)
            except BaseException as exc:  # reported to the consumer
                failure.append(exc)
            finally:
                tokens.put(done)

        worker = threading.Thread(target=produce, name="genie-query", daemon=True)
        worker.start()
        try:
            while (token := tokens.get()) is not done:
                if token in self.eos_ids:
                    break
                yield token
            if failure:
                raise failure[0]
        finally:
            if worker.is_alive():
                self.backend.dialog.abort()
                worker.join()

    def _run_padded(self, ids: np.ndarray) -> np.ndarray:
        """(1, n) ids -> logits (1, n, vocab) on a static graph of S >= n tokens: padded on the right; with a causal
        mask, padding after position n-1 cannot change its logits."""
        n = ids.shape[1]
        row = np.full((1, self.backend.seq_len), self.tokenizer.pad_token_id or 0, dtype=np.int64)
        row[0, :n] = ids[0]
        return self.backend.run(row)[:, :n]

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template when it has one; otherwise `role: content` lines and `assistant:`."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.prompt_ids(text)

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

    def stream_text(self, ids: list[int], max_new_tokens: int, sampling: generation.Sampling,
                    stop: list[str]) -> Iterator[tuple[str, Optional[str], int]]:
        """(text delta, finish reason or None, tokens generated so far), ending with the finish reason.

        Text is decoded from all tokens so far and released only when it cannot change: not inside an incomplete
        UTF-8 character, not a possible start of a stop string. So the deltas concatenate to the full answer."""
        tokens: list[int] = []
        sent = ""
        with self.lock:
            for token in self._tokens(ids, max_new_tokens, sampling):
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                hits = [i for i in (text.find(s, max(len(sent) - len(s), 0)) for s in stop) if i >= 0]
                if hits:
                    cut = min(hits)
                    yield text[len(sent):cut], "stop", len(tokens)
                    return
                safe = len(text.rstrip("\ufffd"))
                for s in stop:  # hold back a tail that may grow into a stop string
                    for k in range(min(len(s) - 1, safe), 0, -1):
                        if text[:safe].endswith(s[:k]):
                            safe -= k
                            break
                if safe > len(sent):
                    yield text[len(sent):safe], None, len(tokens)
                    sent = text[:safe]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        yield text[len(sent):], "length" if len(tokens) == max_new_tokens else "stop", len(tokens)


def create_app(cfg: Config, host: ModelHost | None = None):
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    host = host or ModelHost(cfg)
    budget = cfg.bench.budget_ms
    InferRequest = _infer_request_model()
    CompletionRequest, ChatRequest = _openai_request_models()

    @asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=host.load, name="model-loader", daemon=True).start()  # serve while it loads
        yield

    app = FastAPI(title="antinet-npu", description="Inference and benchmarks on one loaded model.", lifespan=lifespan)
    app.state.host = host

    def require_ready() -> None:
        if host.status != "ready":
            detail = {"loading": "model is loading", "failed": f"model failed to load: {host.error}"}[host.status]
            raise HTTPException(status_code=503, detail=detail)

    @app.get("/api/health")
    def health() -> dict:
        return {"status": host.status, "loaded": host.status == "ready", "error": host.error, **host.info}

    @app.post("/api/infer")
    def infer(req: InferRequest) -> dict:
        require_ready()
        if host.samples_itself:
            raise AntinetError(f"{host.info['backend']} picks tokens itself and gives no logits: use /v1/completions")
        ids = list(req.token_ids) if req.token_ids is not None else host.prompt_ids(req.text)
        host.check_request(ids, req.max_new_tokens)
        start = time.perf_counter()
        with host.lock:  # prefill once; the continuation decodes from the same KV cache
            logits = host.stepper.prefill(np.asarray(ids, dtype=np.int64)).astype(np.float64)
            first_ms = (time.perf_counter() - start) * 1000
            generated, current = [], logits
            for _ in range(req.max_new_tokens):
                generated.append(int(np.argmax(current)))
                if len(generated) == req.max_new_tokens:
                    break
                current = host.stepper.decode(generated[-1])
        logp = logits - logits.max()
        logp = logp - np.log(np.exp(logp).sum())
        top = np.argsort(-logp)[: req.top_k]
        latency = (time.perf_counter() - start) * 1000
        _log_latency("/api/infer", latency, budget)
        return {
            "prompt_tokens": len(ids),
            "next_token_top_k": [{"token_id": int(t), "token": host.tokenizer.decode([int(t)]),
                                  "logprob": round(float(logp[t]), 5)} for t in top],
            "continuation": {"token_ids": generated, "text": host.tokenizer.decode(generated)},
            "latency_ms": round(latency, 3), "first_forward_ms": round(first_ms, 3),
            "backend": host.info["backend"], "device": host.info["device"], "emulated": host.info["emulated"],
            "kv_cache": host.info["kv_cache"],
        }

    def openai_run(req, ids: list[int], chat: bool):
        """The OpenAI-shaped answer (one JSON body, or server-sent events when req.stream)."""
        host.check_request(ids, req.max_tokens)
        if host.samples_itself and "temperature" in req.model_fields_set and req.temperature > 0:
            raise AntinetError(f"{host.info['backend']} samples with its bundle's own sampler (greedy): send "
                               "temperature 0 or leave it out")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = generation.Sampling(temperature=req.temperature, seed=req.seed)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "created": int(time.time()), "model": cfg.model.name}
        events = host.stream_text(ids, req.max_tokens, sampling, stop)
        if not req.stream:
            start = time.perf_counter()
            parts, finish, count = [], None, 0
            for delta, finish, count in events:
                parts.append(delta)
            _log_latency("/v1/chat/completions" if chat else "/v1/completions", (time.perf_counter() - start) * 1000,
                         budget)
            text = "".join(parts)
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
                {"index": 0, "text": text, "logprobs": None}
            return {**head, "object": "chat.completion" if chat else "text_completion",
                    "choices": [{**choice, "finish_reason": finish}],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": count,
                              "total_tokens": len(ids) + count}}

        def sse() -> Iterator[str]:
            kind = "chat.completion.chunk" if chat else "text_completion"
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield f"data: {json.dumps({**head, 'object': kind, 'choices': [first]})}\n\n"
            count = 0
            for delta, finish, count in events:
                body = {"index": 0, "delta": {"content": delta} if delta else {}} if chat else \
                    {"index": 0, "text": delta, "logprobs": None}
                if delta or finish:
                    chunk = {**head, "object": kind, "choices": [{**body, "finish_reason": finish}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": len(ids), "completion_tokens": count, "total_tokens": len(ids) + count}
            yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        require_ready()
        return openai_run(req, host.prompt_ids(req.prompt), chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatRequest):
        require_ready()
        return openai_run(req, host.chat_prompt([m.model_dump() for m in req.messages]), chat=True)

    @app.get("/api/performance/benchmark")
    def benchmark(seq_lens: Optional[str] = Query(None, description="comma-separated sequence lengths (default: "
                                                  "32,128, or the one length a static graph takes)")) -> dict:
        require_ready()
        from antinet_npu.measure.timing import LatencyTracker

        static = host.backend.seq_len
        try:
            lengths = [int(s) for s in seq_lens.split(",") if s.strip()] if seq_lens is not None else \
                [static] if static else [n for n in (32, 128) if n <= host.max_tokens]
        except ValueError:
            raise HTTPException(status_code=422, detail="seq_lens must be comma-separated integers") from None
        if len(lengths) > 8:
            raise HTTPException(status_code=422, detail=f"at most 8 sequence lengths per request, got {len(lengths)}")
        for n in lengths:
            if n < 1 or n > host.max_tokens or (static and n != static):
                limit = f"exactly {static} (a static graph)" if static else f"1..{host.max_tokens}"
                raise HTTPException(status_code=422, detail=f"sequence length {n} not supported: this model takes "
                                    f"{limit} tokens")
        tests = []
        rng = np.random.default_rng(0)
        for n in lengths:
            ids = rng.integers(0, host.vocab_size, (1, n)).astype(np.int64)
            tracker = LatencyTracker()
            with host.lock:
                for _ in range(cfg.bench.warmup):
                    host.backend.run(ids)
                for _ in range(cfg.bench.iterations):
                    with tracker.track():
                        host.backend.run(ids)
            stats = tracker.stats(n)
            for ms in tracker.latencies_ms:
                _log_latency(f"benchmark S={n}", ms, budget)
            tests.append({"sequence_length": n, **{k: stats[k] for k in (
                "avg_latency_ms", "min_latency_ms", "max_latency_ms", "throughput_qps")}})
        return {"device": host.info["device"], "model": cfg.model.name, "backend": host.info["backend"],
                "precision": host.info["precision_run"], "emulated": host.info["emulated"], "tests": tests}

    @app.exception_handler(RequestValidationError)
    def bad_body(_request, exc: RequestValidationError):
        # The default handler echoes the input, and a NaN or Infinity in it cannot be written as JSON (a 500)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.exception_handler(AntinetError)
    def user_error(_request, exc: AntinetError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    return app


def _infer_request_model():
    from pydantic import BaseModel, Field, StrictInt, model_validator

    class InferRequest(BaseModel):
        text: Optional[str] = Field(None, description="prompt text (tokenized with the model's tokenizer)")
        token_ids: Optional[list[StrictInt]] = Field(None, description="prompt token ids (instead of text)")
        top_k: int = Field(5, ge=1, le=100, description="how many next-token candidates to return")
        max_new_tokens: int = Field(0, ge=0, description="greedy continuation length")

        @model_validator(mode="after")
        def one_prompt(self):
            if (self.text is None) == (self.token_ids is None):
                raise ValueError("give exactly one of text or token_ids")
            return self

    return InferRequest


def _openai_request_models():
    """OpenAI's request bodies, the fields this server honours; unknown fields (user, logit_bias, ...) are ignored,
    fields it cannot honour with another value than the default (n, top_p) are rejected."""
    from pydantic import BaseModel, ConfigDict, Field

    class Sampled(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: Optional[str] = Field(None, description="ignored: the server runs one model")
        max_tokens: int = Field(16, ge=1, description="new tokens at most")
        temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
        seed: Optional[int] = Field(None, description="sampling seed (temperature > 0)")
        stop: Union[str, list[str], None] = Field(None, description="stop sequences (not included in the text)")
        stream: bool = Field(False, description="server-sent events, one per text delta, then [DONE]")
        n: Literal[1] = 1
        top_p: Literal[1, 1.0] = 1.0

    class CompletionRequest(Sampled):
        prompt: str = Field(..., min_length=1)

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class ChatRequest(Sampled):
        messages: list[Message] = Field(..., min_length=1)

    return CompletionRequest, ChatRequest


def _log_latency(what: str, ms: float, budget: float) -> None:
    if ms > budget:
        log.warning("%s: %.2f ms, over the %.0f ms budget", what, ms, budget)
    else:
        log.info("%s: %.2f ms", what, ms)


def main(cfg: Config) -> int:
    try:
        import uvicorn
    except ImportError:
        raise AntinetError("the server needs the serve extra: pip install 'antinet-npu[serve]'") from None
    log.info("serving %s on http://%s:%d (model loads in the background; 503 until ready)", cfg.serve.run,
             cfg.serve.host, cfg.serve.port)
    uvicorn.run(create_app(cfg), host=cfg.serve.host, port=cfg.serve.port, log_level="warning")
    return 0
