"""`antinet-npu serve`: an HTTP API on one loaded model (FastAPI + uvicorn, the `serve` extra).

The server answers at once; the model loads in a background thread (tokenizer, backend through `open_run`, warm-up).
Until then, and if loading failed, model endpoints return 503 with the reason. Requests to the model become jobs of
the `engine` (one thread, a bounded queue, cancel within one decode step, a prefix cache); everything else
(`/api/health`, `/metrics`, `/api/stats`, `/dashboard`, `/v1/models`) answers from the event loop and never waits
for the model. `/v1/completions` and `/v1/chat/completions` speak OpenAI's protocol (server-sent events when
`stream` is true).
"""

import asyncio
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from starlette.responses import Response

from antinet_npu import AntinetError
from antinet_npu.config import Config
from antinet_npu.runtime.engine import Engine, Failed, Finished, Job, ModelHost, QueueFull, Started
from antinet_npu.runtime.monitor import RequestRecord, ServeMonitor

log = logging.getLogger("serve")

MODEL_ENDPOINTS = ("/api/infer", "/v1/completions", "/v1/chat/completions", "/api/performance/benchmark")
DASHBOARD = Path(__file__).with_name("dashboard.html")


class HttpError(Exception):
    """An answer other than 200 for a request to the model: counted as rejected (4xx/503) or by `outcome`."""

    def __init__(self, status: int, detail: Any, headers: dict | None = None, outcome: str = "rejected"):
        super().__init__(str(detail))
        self.status, self.detail, self.headers, self.outcome = status, detail, headers, outcome


@dataclass
class Call:
    """One request to the model, from arrival to its last byte: what the monitor records, exactly once."""

    monitor: ServeMonitor
    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cached: int = 0
    done: bool = False

    def token(self) -> None:
        self.tokens_out += 1
        if self.first is None:
            self.first = time.perf_counter()

    def finish(self, outcome: str) -> None:
        if self.done:
            return
        self.done = True
        now = time.perf_counter()
        if outcome == "answered" and self.first is None:  # an answer with no token (EOS first): the answer is first
            self.first = now
        if outcome != "rejected" and self.tokens_in:
            self.monitor.cache_used(self.cached)
        ttft = None if self.first is None else (self.first - self.start) * 1000
        latency = (now - self.start) * 1000
        self.monitor.record(RequestRecord(time.time(), self.endpoint, outcome, ttft, latency, self.tokens_in,
                                          self.tokens_out, self.cached))
        over = ttft is not None and ttft > self.monitor.budget_ms
        log.log(logging.WARNING if over else logging.INFO, "%s: %s in %.2f ms%s%s", self.endpoint, outcome, latency,
                "" if ttft is None else f", first token {ttft:.2f} ms", f", over the {self.monitor.budget_ms:g} ms "
                "budget" if over else "")


def _outcome(reason: str) -> str:
    return {"cancelled": "cancelled", "timeout": "timeout"}.get(reason, "answered")


class JobStream(Response):
    """Server-sent events from a job; the job is cancelled when the response ends for any reason (client gone,
    server shutting down), so the model is free within one decode step. Listens for the client's disconnect the
    whole time, not only when a chunk is sent."""

    def __init__(self, events: AsyncIterator[str], jobs: list[Job]):
        super().__init__(media_type="text/event-stream")
        self.events, self.jobs = events, jobs

    async def __call__(self, scope, receive, send) -> None:
        async def stream():
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache")]})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def disconnect():
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(stream()), asyncio.ensure_future(disconnect())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for job in self.jobs:
                job.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.events.aclose()


class BodyLimit:
    """ASGI middleware: counts every answer by endpoint and status, and refuses a body over the cap before the
    app reads it (Content-Length, or counting a chunked body as it arrives)."""

    def __init__(self, app, monitor: ServeMonitor, max_bytes: int):
        self.app, self.monitor, self.max_bytes = app, monitor, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in MODEL_ENDPOINTS or path in _OTHER_ENDPOINTS else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.monitor.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        length = dict(scope["headers"]).get(b"content-length")
        too_big = length is not None and length.isdigit() and int(length) > self.max_bytes
        if not too_big and scope["method"] == "POST":
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_bytes:
                    too_big = True
                    break
                if not message.get("more_body"):
                    break
            body, inner, replayed = b"".join(chunks), receive, False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await inner()
            receive = replay
        if too_big:
            if path in MODEL_ENDPOINTS:
                Call(self.monitor, path).finish("rejected")
            detail = f"request body over {self.max_bytes // 1024} KB (serve.max_body_kb): send a shorter prompt"
            payload = json.dumps({"detail": detail}).encode()
            await counted_send({"type": "http.response.start", "status": 413,
                                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, receive, counted_send)


_OTHER_ENDPOINTS = ("/api/health", "/metrics", "/api/stats", "/dashboard", "/v1/models")


def create_app(cfg: Config, host: ModelHost | None = None):
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from antinet_npu.runtime import openai_api as oa

    host = host or ModelHost(cfg)
    monitor = ServeMonitor(cfg.bench.budget_ms)
    limits = cfg.serve
    state: dict[str, Any] = {}

    def idle_bench(engine: Engine) -> None:
        """The idle-time benchmark: a 32-token prefill and 8 decode steps, into /metrics and the dashboard."""
        last = max(state.get("bench_at", 0.0), engine.last_active)
        if not limits.bench_every_s or time.monotonic() - last < limits.bench_every_s:
            return
        import numpy as np

        from antinet_npu.measure.timing import GenerationTracker

        tracker = GenerationTracker()
        prompt = np.random.default_rng(0).integers(0, host.vocab_size, 32).astype(np.int64)
        if host.samples_itself:
            tracker.add(*host.backend.timed_generate(prompt, 8))
        else:
            tracker.generate(host.stepper, prompt, 8)
        state["bench_at"] = time.monotonic()
        monitor.bench_result(tracker.stats())

    def load() -> None:
        host.load()
        if host.status == "ready":
            monitor.describe_model(host.info)

    @asynccontextmanager
    async def lifespan(_app):
        state["engine"] = Engine(host, on_step=monitor.step.observe, on_idle=idle_bench)
        threading.Thread(target=load, name="model-loader", daemon=True).start()  # serve while it loads
        yield
        state["engine"].stop(wait_s=5.0)

    app = FastAPI(title="antinet-npu", lifespan=lifespan,
                  description="OpenAI-compatible completions, inference and benchmarks on one loaded model; "
                              "/metrics (Prometheus) and /dashboard.")
    app.state.host = host
    app.state.monitor = monitor

    def engine() -> Engine:
        return state["engine"]

    def require_ready() -> None:
        if host.status != "ready":
            detail = {"loading": "model is loading", "failed": f"model failed to load: {host.error}"}[host.status]
            raise HttpError(503, detail, {"Retry-After": "5"} if host.status == "loading" else None)

    def submit(work) -> Job:
        try:
            return engine().submit(work, asyncio.get_running_loop(), limits.request_timeout_s)
        except QueueFull as full:
            raise HttpError(429, f"{limits.max_queue} requests are waiting for the model (serve.max_queue): retry "
                            f"in {full.retry_after_s} s", {"Retry-After": str(full.retry_after_s)}) from None

    async def next_item(job: Job, request: Request):
        """The job's next item. About twice a second, whether the client is still there: one that went away
        cancels the job (whose end still comes, within one decode step)."""
        while True:
            if time.monotonic() - job.checked > 0.5:
                job.checked = time.monotonic()
                if not job.cancelled.is_set() and await request.is_disconnected():
                    job.cancel()
            try:
                return await asyncio.wait_for(job.out.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue

    def failed(call: Call, error: BaseException) -> HttpError:
        """The engine could not do the work: counted as failed, answered with one line."""
        call.finish("failed")
        if not isinstance(error, AntinetError):
            log.error("request failed: %s", error)
        return HttpError(422 if isinstance(error, AntinetError) else 500, str(error).splitlines()[0] if str(error)
                         else type(error).__name__, outcome="failed")

    def stopped(call: Call, reason: str) -> HttpError:
        """The job ended before its answer: past its deadline (504), or its client went away."""
        call.finish(_outcome(reason))
        if reason == "timeout":
            return HttpError(504, timeout_detail(), outcome="timeout")
        return HttpError(499, "the request was cancelled", outcome="cancelled")

    async def run_job(call: Call, request: Request, work):
        """Queue one piece of work that answers at once (no tokens stream) and wait for its result."""
        job = submit(work)
        try:
            while not isinstance(item := await next_item(job, request), (Finished, Failed)):
                if isinstance(item, Started):
                    call.cached = item.cached_tokens
        finally:
            job.cancel()
        if isinstance(item, Failed):
            raise failed(call, item.error)
        if item.reason != "done":
            raise stopped(call, item.reason)
        return item.result

    def tokenize(text: str) -> list[int]:
        return host.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_ids(messages: list[dict]) -> list[int]:
        """The tokenizer's chat template when it has one; otherwise `role: content` lines and `assistant:`."""
        if getattr(host.tokenizer, "chat_template", None):
            text = host.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenize(text)

    def timeout_detail() -> str:
        return f"the request ran past its deadline of {limits.request_timeout_s:g} s (serve.request_timeout_s)"

    # --- endpoints that never wait for the model --------------------------------------------------------------

    @app.get("/api/health")
    async def health() -> dict:
        return {"status": host.status, "loaded": host.status == "ready", "error": host.error, **host.info,
                "queue_depth": engine().depth, "in_flight": int(engine().busy)}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(monitor.exposition(engine()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/stats")
    async def stats(since: float = Query(0.0, description="only requests finished after this unix time")) -> dict:
        return {"status": host.status, "error": host.error, "info": {k: host.info.get(k) for k in (
            "model", "run", "backend", "device", "emulated", "precision_run", "fallback_reason", "kv_cache")},
            **monitor.stats(engine(), since)}

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD.read_text())

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cfg.model.name, "object": "model", "created": 0,
                                            "owned_by": "antinet-npu"}]}

    # --- requests to the model --------------------------------------------------------------------------------

    @app.post("/api/infer")
    async def infer(req: oa.InferRequest, request: Request) -> dict:
        call = Call(monitor, "/api/infer")
        require_ready()
        if host.samples_itself:
            raise AntinetError(f"{host.info['backend']} picks tokens itself and gives no logits: use /v1/completions")
        ids = list(req.token_ids) if req.token_ids is not None else tokenize(req.text)
        host.check_request(ids, req.max_new_tokens)
        call.tokens_in = len(ids)
        result = await run_job(call, request, lambda j: engine().infer(j, ids, req.top_k, req.max_new_tokens))
        call.first, call.tokens_out = call.start + result["first_ms"] / 1000, len(result["generated"])
        call.finish("answered")
        latency = (time.perf_counter() - call.start) * 1000
        return {
            "prompt_tokens": len(ids),
            "next_token_top_k": [{"token_id": t, "token": host.tokenizer.decode([t]), "logprob": round(lp, 5)}
                                 for t, lp in result["top"]],
            "continuation": {"token_ids": result["generated"], "text": host.tokenizer.decode(result["generated"])},
            "latency_ms": round(latency, 3), "first_forward_ms": round(result["first_ms"], 3),
            "cached_tokens": result["cached_tokens"],
            "backend": host.info["backend"], "device": host.info["device"], "emulated": host.info["emulated"],
            "kv_cache": host.info["kv_cache"],
        }

    def prepare(req, prompts: list[list[int]]):
        """Everything checked before the first byte of an answer: a stream never starts only to fail."""
        for ids in prompts:
            host.check_request(ids, req.new_tokens)
        if host.samples_itself and req.temperature:
            raise AntinetError(f"{host.info['backend']} samples with its bundle's own sampler (greedy): send "
                               "temperature 0 or leave it out")
        sampling = req.sampling()
        sampling.picker()  # a seed numpy refuses fails here, as a 422
        return sampling, req.stops(limits.max_stop)

    def submit_all(prompts: list[list[int]], req, sampling) -> list[Job]:
        """One job per prompt, all queued before the answer starts: a full queue is a 429, never a broken stream."""
        jobs: list[Job] = []
        try:
            for ids in prompts:
                jobs.append(submit(lambda j, ids=ids: engine().generate(j, ids, req.new_tokens, sampling)))
        except HttpError:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    async def generate(call: Call, request: Request, job: Job, stop: list[str]):
        """Text deltas of one generation: (delta, finish reason or None); the last has the reason."""
        asm = oa.TextAssembler(host.tokenizer, stop)
        try:
            while True:
                item = await next_item(job, request)
                if isinstance(item, Started):
                    call.cached += item.cached_tokens
                elif isinstance(item, int):
                    if asm.stopped:
                        continue  # already cut: tokens the engine made before it saw the cancel
                    call.token()
                    delta = asm.add(item)
                    if asm.stopped:
                        job.cancel()
                    if delta:
                        yield delta, None
                elif isinstance(item, Failed):
                    raise item.error
                else:
                    reason = "stop" if asm.stopped else item.reason
                    yield asm.finish(), reason
                    return
        finally:
            job.cancel()

    def openai_body(req, chat: bool, prompts: list[list[int]], request: Request, endpoint: str):
        call = Call(monitor, endpoint, tokens_in=sum(len(p) for p in prompts))
        sampling, stop = prepare(req, prompts)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": ident, "created": int(time.time()), "model": cfg.model.name}
        kind = ("chat.completion.chunk" if chat else "text_completion") if req.stream else \
            ("chat.completion" if chat else "text_completion")
        usage = {"prompt_tokens": call.tokens_in, "completion_tokens": 0, "total_tokens": call.tokens_in}
        jobs = submit_all(prompts, req, sampling)

        def chunk(index: int, delta: str, finish: Optional[str], role: bool = False) -> str:
            if chat:
                body = {"index": index, "delta": ({"role": "assistant", "content": ""} if role else
                                                  {"content": delta} if delta else {})}
            else:
                body = {"index": index, "text": delta, "logprobs": None}
            return f"data: {json.dumps({**head, 'object': kind, 'choices': [{**body, 'finish_reason': finish}]})}\n\n"

        async def sse() -> AsyncIterator[str]:
            outcome = "cancelled"  # unless it reaches its end
            try:
                for index, job in enumerate(jobs):
                    if chat:
                        yield chunk(index, "", None, role=True)
                    async for delta, finish in generate(call, request, job, stop):
                        if finish == "timeout":
                            outcome = "timeout"
                            error = {"message": timeout_detail(), "type": "timeout", "code": 504}
                            yield f"data: {json.dumps({'error': error})}\n\n"
                            return
                        if finish == "cancelled":
                            return
                        if delta or finish:
                            yield chunk(index, delta, finish)
                usage.update(completion_tokens=call.tokens_out, total_tokens=call.tokens_in + call.tokens_out)
                if req.include_usage:
                    yield f"data: {json.dumps({**head, 'object': kind, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
                outcome = "answered"
            except Exception as exc:  # headers are sent: an error event, never a cut stream
                outcome = "failed"
                if not isinstance(exc, AntinetError):
                    log.exception("streamed request failed")
                yield f"data: {json.dumps({'error': {'message': str(exc).splitlines()[0], 'type': 'error'}})}\n\n"
            finally:
                call.finish(outcome)

        if req.stream:
            return JobStream(sse(), jobs)

        async def whole() -> dict:
            choices = []
            try:
                for index, job in enumerate(jobs):
                    parts, finish = [], None
                    async for delta, finish in generate(call, request, job, stop):
                        parts.append(delta)
                    if finish in ("cancelled", "timeout"):
                        raise stopped(call, finish)
                    text = "".join(parts)
                    choices.append({"index": index, "message": {"role": "assistant", "content": text}} if chat else
                                   {"index": index, "text": text, "logprobs": None})
                    choices[-1]["finish_reason"] = finish
            except HttpError:
                raise
            except asyncio.CancelledError:  # the server is shutting down
                call.finish("cancelled")
                raise
            except Exception as exc:
                raise failed(call, exc) from None
            finally:
                for job in jobs:
                    job.cancel()
            call.finish("answered")
            usage.update(completion_tokens=call.tokens_out, total_tokens=call.tokens_in + call.tokens_out)
            return {**head, "object": kind, "choices": choices, "usage": usage}

        return whole()

    @app.post("/v1/completions")
    async def completions(req: oa.CompletionRequest, request: Request):
        require_ready()
        prompts = [p if isinstance(p, list) else tokenize(p) for p in req.prompts()]
        result = openai_body(req, False, prompts, request, "/v1/completions")
        return result if isinstance(result, JobStream) else await result

    @app.post("/v1/chat/completions")
    async def chat_completions(req: oa.ChatRequest, request: Request):
        require_ready()
        ids = chat_ids([m.as_dict() for m in req.messages])
        result = openai_body(req, True, [ids], request, "/v1/chat/completions")
        return result if isinstance(result, JobStream) else await result

    @app.get("/api/performance/benchmark")
    async def benchmark(request: Request, seq_lens: Optional[str] = Query(
            None, description="comma-separated sequence lengths (default: 32,128, or the one length a static "
                              "graph takes)")) -> dict:
        call = Call(monitor, "/api/performance/benchmark")
        require_ready()
        if host.samples_itself:
            raise AntinetError(f"{host.info['backend']} runs whole generations only: use bench-gen for its figures")
        static = host.backend.seq_len
        try:
            lengths = [int(s) for s in seq_lens.split(",") if s.strip()] if seq_lens is not None else \
                [static] if static else [n for n in (32, 128) if n <= host.max_tokens]
        except ValueError:
            raise AntinetError("seq_lens must be comma-separated integers") from None
        if len(lengths) > 8:
            raise AntinetError(f"at most 8 sequence lengths per request, got {len(lengths)}")
        for n in lengths:
            if n < 1 or n > host.max_tokens or (static and n != static):
                limit = f"exactly {static} (a static graph)" if static else f"1..{host.max_tokens}"
                raise AntinetError(f"sequence length {n} not supported: this model takes {limit} tokens")
        results = await run_job(call, request, lambda j: engine().benchmark(j, lengths, cfg.bench.warmup,
                                                                             cfg.bench.iterations))
        call.first = time.perf_counter()
        call.finish("answered")
        tests = []
        for n, tracker in results:
            stats = tracker.stats(n)
            tests.append({"sequence_length": n, **{k: stats[k] for k in (
                "avg_latency_ms", "min_latency_ms", "max_latency_ms", "throughput_qps")}})
        return {"device": host.info["device"], "model": cfg.model.name, "backend": host.info["backend"],
                "precision": host.info["precision_run"], "emulated": host.info["emulated"], "tests": tests}

    # --- errors: one line, the right status, counted once ------------------------------------------------------

    def rejected(request: Request, status: int, detail: Any, headers: dict | None = None) -> JSONResponse:
        if request.url.path in MODEL_ENDPOINTS:
            Call(monitor, request.url.path).finish("rejected")
        return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)

    @app.exception_handler(RequestValidationError)
    def bad_body(request: Request, exc: RequestValidationError):
        # The default handler echoes the input, and a NaN or Infinity in it cannot be written as JSON (a 500)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        # a union field (prompt, stop, content) reports every alternative: keep the one that says what is wrong
        errors = [e for e in errors if e["type"] == "value_error"] or errors
        return rejected(request, 422, errors)

    @app.exception_handler(AntinetError)
    def user_error(request: Request, exc: AntinetError):
        return rejected(request, 422, str(exc))

    @app.exception_handler(HttpError)
    def http_error(request: Request, exc: HttpError):
        if exc.outcome != "rejected":  # the call was counted with its outcome already
            return JSONResponse(status_code=exc.status, content={"detail": exc.detail}, headers=exc.headers)
        return rejected(request, exc.status, exc.detail, exc.headers)

    @app.exception_handler(Exception)
    def unexpected(request: Request, exc: Exception):  # a bug: one line to the client, the traceback in the log
        log.error("%s failed", request.url.path, exc_info=exc)
        if request.url.path in MODEL_ENDPOINTS:
            Call(monitor, request.url.path).finish("failed")
        return JSONResponse(status_code=500, content={"detail": f"internal error: {type(exc).__name__}: see the "
                                                                "server log"})

    @app.exception_handler(StarletteHTTPException)
    def http_exception(request: Request, exc: StarletteHTTPException):  # 404, 405
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)

    app.add_middleware(BodyLimit, monitor=monitor, max_bytes=limits.max_body_kb * 1024)
    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything says "serving": a port in use is one line and exit 1."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AntinetError(f"cannot listen on {host}:{port}: {exc.strerror or exc}: choose another port with "
                           "--port (or serve.port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(cfg: Config) -> int:
    import uvicorn

    sock = bind(cfg.serve.host, cfg.serve.port)
    log.info("serving %s on http://%s:%d (model loads in the background; 503 until ready; dashboard at /dashboard)",
             cfg.serve.run, cfg.serve.host, cfg.serve.port)
    config = uvicorn.Config(create_app(cfg), log_level="warning", timeout_graceful_shutdown=cfg.serve.drain_s)
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again: by then, stopping is what was asked for
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    log.info("stopped")
    return 0
