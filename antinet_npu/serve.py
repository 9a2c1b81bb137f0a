"""`antinet-npu serve`: an HTTP API on one loaded model (FastAPI + uvicorn, the `serve` extra).

The server answers at once; the model loads in a background thread (tokenizer, backend through the bench fallback
chain, warm-up). Until then, and if loading failed, model endpoints return 503 with the reason. One forward pass
runs at a time (a lock serializes requests): backends such as the QNN HTP one are not built for concurrent runs, and
on one NPU, queueing is what would happen anyway.
"""

import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, Optional

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.config import Config

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

    def load(self) -> None:
        try:
            from antinet_npu import artifacts, checkpoint
            from antinet_npu.backends import open_with_fallback
            from antinet_npu.provenance import versions

            start = time.perf_counter()
            snapshot = artifacts.pytorch_dir(self.cfg.model.name)
            if not snapshot.is_dir():
                raise AntinetError(f"no prepared model at {snapshot}: run `dvc repro` first")
            self.tokenizer = checkpoint.load_tokenizer(snapshot)
            self.vocab_size = checkpoint.snapshot_config(snapshot)["vocab_size"]
            backend, how = open_with_fallback(self.cfg, self.cfg.serve.run)
            self.max_tokens = backend.seq_len or checkpoint.max_positions(checkpoint.snapshot_config(snapshot))
            probe = np.zeros((1, backend.seq_len or 8), dtype=np.int64)
            for _ in range(self.cfg.serve.warmup):
                backend.run(probe)
            self.backend = backend
            self.info.update(backend.describe(), **how, static_seq_len=backend.seq_len, max_tokens=self.max_tokens,
                             versions=versions())
            self.status = "ready"
            log.info("model ready in %.1f s: %s on %s (%s)%s", time.perf_counter() - start, self.cfg.serve.run,
                     self.info["backend"], self.info["device"], ", emulated" if self.info["emulated"] else "")
        except Exception as exc:  # any failure must surface as 503 + reason, never kill the server
            self.status, self.error = "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("loading failed: %s", self.error)

    def forward(self, ids: list[int]) -> tuple[np.ndarray, float]:
        """Logits at the last position of `ids`, and the forward pass's latency (ms)."""
        n = len(ids)
        static = self.backend.seq_len
        # A static graph takes exactly S tokens: pad on the right; with a causal mask, padding after position n-1
        # cannot change its logits.
        pad = self.tokenizer.pad_token_id or 0
        row = np.asarray(ids + [pad] * ((static or n) - n), dtype=np.int64)[None]
        with self.lock:
            start = time.perf_counter()
            logits = self.backend.run(row)
            ms = (time.perf_counter() - start) * 1000
        return logits[0, n - 1].astype(np.float64), ms


def create_app(cfg: Config, host: ModelHost | None = None):
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import JSONResponse

    host = host or ModelHost(cfg)
    budget = cfg.bench.budget_ms
    InferRequest = _infer_request_model()

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
        if req.max_new_tokens > cfg.serve.max_new_tokens:
            raise HTTPException(status_code=422, detail=f"max_new_tokens is limited to {cfg.serve.max_new_tokens} "
                                "(serve.max_new_tokens)")
        ids = list(req.token_ids) if req.token_ids is not None else \
            host.tokenizer(req.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise HTTPException(status_code=422, detail="the prompt is empty")
        if min(ids) < 0 or max(ids) >= host.vocab_size:
            raise HTTPException(status_code=422, detail=f"token ids must be in 0..{host.vocab_size - 1}")
        if len(ids) + req.max_new_tokens > host.max_tokens:
            raise HTTPException(status_code=422, detail=(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the model's limit of "
                f"{host.max_tokens} tokens"))
        start = time.perf_counter()
        logits, first_ms = host.forward(ids)
        logp = logits - logits.max()
        logp = logp - np.log(np.exp(logp).sum())
        top = np.argsort(-logp)[: req.top_k]
        generated, current = [], logits
        for _ in range(req.max_new_tokens):
            nxt = int(np.argmax(current))
            generated.append(nxt)
            if len(generated) == req.max_new_tokens:
                break
            current, _ = host.forward(ids + generated)
        latency = (time.perf_counter() - start) * 1000
        _log_latency("/api/infer", latency, budget)
        return {
            "prompt_tokens": len(ids),
            "next_token_top_k": [{"token_id": int(t), "token": host.tokenizer.decode([int(t)]),
                                  "logprob": round(float(logp[t]), 5)} for t in top],
            "continuation": {"token_ids": generated, "text": host.tokenizer.decode(generated)},
            "latency_ms": round(latency, 3), "first_forward_ms": round(first_ms, 3),
            "backend": host.info["backend"], "device": host.info["device"], "emulated": host.info["emulated"],
        }

    @app.get("/api/performance/benchmark")
    def benchmark(seq_lens: str = Query("32,128", description="comma-separated sequence lengths")) -> dict:
        require_ready()
        from antinet_npu.timing import LatencyTracker

        try:
            lengths = [int(s) for s in seq_lens.split(",") if s.strip()]
        except ValueError:
            raise HTTPException(status_code=422, detail="seq_lens must be comma-separated integers") from None
        static = host.backend.seq_len
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

    @app.exception_handler(AntinetError)
    def user_error(_request, exc: AntinetError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    return app


def _infer_request_model():
    from pydantic import BaseModel, Field, model_validator

    class InferRequest(BaseModel):
        text: Optional[str] = Field(None, description="prompt text (tokenized with the model's tokenizer)")
        token_ids: Optional[list[int]] = Field(None, description="prompt token ids (instead of text)")
        top_k: int = Field(5, ge=1, le=100, description="how many next-token candidates to return")
        max_new_tokens: int = Field(0, ge=0, description="greedy continuation length")

        @model_validator(mode="after")
        def one_prompt(self):
            if (self.text is None) == (self.token_ids is None):
                raise ValueError("give exactly one of text or token_ids")
            return self

    return InferRequest


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
