"""`antinet-npu serve`: the real server on a loopback port, spoken to over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TEST_OVERRIDES

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, project, *overrides):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "antinet_npu", "serve", "--port", str(self.port),
                                      *TEST_OVERRIDES, *overrides], cwd=project, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the server answers before the model is loaded
            try:
                self.get("/api/health")
                return
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, self.proc.stdout.read()
                time.sleep(0.1)
        raise AssertionError("server did not start")

    def request(self, path, body=None):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path):
        return self.request(path)

    def stream(self, path, body) -> tuple[str, list]:
        """Server-sent events: (content type, the `data:` payloads, JSON-decoded except the final [DONE])."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            kind, text = resp.headers["content-type"], resp.read().decode()
        events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
        return kind, [e if e == "[DONE]" else json.loads(e) for e in events]

    def wait_ready(self, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, health = self.get("/api/health")
            if health["status"] != "loading":
                return health
            time.sleep(0.2)
        raise AssertionError("model did not load")

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return out


def test_503_until_loaded_then_inference_and_benchmark_on_the_npu_backend(pipeline):
    # 25 warm-up passes on the HTP emulator keep the model loading for several seconds after the server is up.
    server = Server(pipeline.path, "serve.run=qnn-htp-w8a16-32", "serve.warmup=25")
    try:
        status, body = server.request("/api/infer", {"text": "Return the"})
        assert status == 503 and body["detail"] == "model is loading"
        assert server.get("/api/health")[1]["loaded"] is False
        health = server.wait_ready()
        assert health["loaded"] is True and health["backend"] == "qnn-htp" and health["emulated"] is True
        assert health["static_seq_len"] == 32 and health["versions"]["qnn"]

        status, body = server.request("/api/infer", {"text": "Return the value of", "top_k": 3, "max_new_tokens": 4})
        assert status == 200, body
        assert len(body["next_token_top_k"]) == 3 and len(body["continuation"]["token_ids"]) == 4
        assert body["latency_ms"] > 0 and body["emulated"] is True

        assert health["kv_cache"] is False  # a static graph: continuations re-run the padded prefix
        status, body = server.request("/api/infer", {"token_ids": list(range(1, 31)), "max_new_tokens": 5})
        assert status == 422 and "exceeds the model's limit of 32 tokens" in body["detail"]
        status, body = server.request("/v1/completions", {"prompt": "Return the", "max_tokens": 3, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] <= 3, body

        status, body = server.get("/api/performance/benchmark?seq_lens=32")
        assert status == 200 and body["model"] == "tiny-qwen2" and body["emulated"] is True
        assert list(body["tests"][0]) == ["sequence_length", "avg_latency_ms", "min_latency_ms", "max_latency_ms",
                                          "throughput_qps"]
        status, body = server.get("/api/performance/benchmark")  # default: the one length a static graph takes
        assert status == 200 and [t["sequence_length"] for t in body["tests"]] == [32]
        status, body = server.get("/api/performance/benchmark?seq_lens=32,128")
        assert status == 422 and "takes exactly 32 (a static graph) tokens" in body["detail"]
    finally:
        log = server.stop()
    assert "/api/infer:" in log and "ms" in log  # every request's latency is logged


def test_bad_inputs_and_concurrency(pipeline):
    server = Server(pipeline.path, "serve.run=ort-cpu-fp32-32", "serve.warmup=1")
    try:
        assert server.wait_ready()["backend"] == "ort-cpu"
        assert server.request("/api/infer", b"{not json")[0] == 422
        assert server.request("/api/infer", {"text": "x", "token_ids": [1]})[0] == 422
        assert server.request("/api/infer", {"token_ids": [1, 5000]})[0] == 422
        assert server.request("/api/infer", {"text": "x", "top_k": 0})[0] == 422
        status, body = server.request("/api/infer", {"text": "x", "max_new_tokens": 1000})
        assert status == 422 and "over the limit of 64 (serve.max_new_tokens)" in body["detail"]
        status, body = server.get("/api/performance/benchmark?seq_lens=" + ",".join(["8"] * 20))
        assert status == 422 and "at most 8 sequence lengths" in body["detail"]
        for bad in (b'{"text": "a", "top_k": NaN}', b'{"text": "a", "max_new_tokens": Infinity}',
                    b'{"token_ids": ["1", 2]}', b'{"token_ids": [true, 2]}'):
            status, body = server.request("/api/infer", bad)
            assert status == 422 and isinstance(body["detail"], list), bad

        def call(i):
            ids = [(7 * i + k) % 2000 + 1 for k in range(i % 20 + 1)]
            return i, len(ids), server.request("/api/infer", {"token_ids": ids, "max_new_tokens": 2})

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(call, range(100)))
        assert len(results) == 100
        for i, n, (status, body) in results:
            assert status == 200, (i, body)
            assert body["prompt_tokens"] == n and len(body["continuation"]["token_ids"]) == 2
    finally:
        server.stop()


def test_failed_load_is_503_with_the_reason(pipeline):
    server = Server(pipeline.path, "serve.run=ort-cpu-int4-block-32", "+bench.runs.ort-cpu-int4-block-32={backend: "
                    "ort-cpu, precision: int4-block, seq_len: 32, model: onnx/absent.onnx, weights: onnx/absent.onnx}")
    try:
        health = server.wait_ready()
        assert health["status"] == "failed" and "absent.onnx not found" in health["error"]
        status, body = server.request("/api/infer", {"text": "x"})
        assert status == 503 and body["detail"].startswith("model failed to load:")
    finally:
        server.stop()


def _chat(server, **extra):
    body = {"model": "anything", "messages": [{"role": "system", "content": "Answer briefly."},
                                              {"role": "user", "content": "Return the value"}],
            "max_tokens": 12, "temperature": 0, **extra}
    return body


def test_openai_endpoints_stream_what_they_answer_and_infer_uses_the_cache(pipeline):
    import numpy as np

    from antinet_npu.build import checkpoint
    from antinet_npu.config import load
    from antinet_npu.runtime import generation
    from antinet_npu.runtime.backends.ort_cpu import OrtCpuBackend

    server = Server(pipeline.path, "serve.run=ort-cpu-fp32-32", "serve.warmup=1")
    try:
        assert server.wait_ready()["kv_cache"] is True
        # /api/infer continues through the KV cache: the same tokens as re-running the whole prefix each time
        status, infer = server.request("/api/infer", {"text": "Return the value of", "max_new_tokens": 10})
        assert status == 200 and infer["kv_cache"] is True
        cfg = load(pipeline.path / "params.yaml")
        backend = OrtCpuBackend(cfg, "burst")
        backend.load(pipeline.path / "models/onnx/tiny-qwen2.onnx")
        ids = checkpoint.load_tokenizer(pipeline.path / "models/pytorch/tiny-qwen2")(
            "Return the value of", add_special_tokens=False)["input_ids"]
        old_path = generation.RecomputeStepper(backend.run, 512)
        assert infer["continuation"]["token_ids"] == list(generation.generate(old_path, np.array(ids), 10))

        status, full = server.request("/v1/chat/completions", _chat(server))
        assert status == 200, full
        assert full["object"] == "chat.completion" and full["id"].startswith("chatcmpl-")
        assert full["model"] == "tiny-qwen2" and isinstance(full["created"], int)
        choice = full["choices"][0]
        assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        usage = full["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

        kind, events = server.stream("/v1/chat/completions", _chat(server, stream=True))
        assert kind.startswith("text/event-stream") and events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == choice["message"]["content"] and len([c for c in chunks if c["choices"]]) > 2
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finishes[-1] == choice["finish_reason"] and not any(finishes[:-1])
        assert chunks[-1]["usage"] == usage

        # stop sequences: cut before the first match, in both modes
        status, plain = server.request("/v1/completions", {"prompt": "Return the value of", "max_tokens": 24,
                                                           "temperature": 0})
        assert status == 200 and plain["object"] == "text_completion"
        whole = plain["choices"][0]["text"]
        stop = whole[len(whole) // 2: len(whole) // 2 + 2]
        assert stop
        body = {"prompt": "Return the value of", "max_tokens": 24, "temperature": 0, "stop": [stop]}
        status, cut = server.request("/v1/completions", body)
        assert cut["choices"][0]["text"] == whole[:whole.find(stop)] and cut["choices"][0]["finish_reason"] == "stop"
        _, events = server.stream("/v1/completions", {**body, "stream": True})
        assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == whole[:whole.find(stop)]

        # sampling: a seed makes it repeatable
        sampled = [server.request("/v1/completions", {"prompt": "Return", "max_tokens": 8, "temperature": 0.9,
                                                      "seed": 7})[1]["choices"][0]["text"] for _ in range(2)]
        assert sampled[0] == sampled[1]

        for bad in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                    {"messages": [{"role": "user"}]}, {"messages": "hello"}):
            assert server.request("/v1/chat/completions", bad)[0] == 422, bad
        assert server.request("/v1/completions", b'{"prompt": "x", "temperature": NaN}')[0] == 422
        assert server.request("/v1/completions", {"prompt": "x", "max_tokens": 0})[0] == 422
        assert server.request("/v1/completions", {"prompt": "", "max_tokens": 4})[0] == 422
        assert server.request("/v1/completions", {"prompt": "x", "n": 2})[0] == 422
        status, body = server.request("/v1/completions", {"prompt": "x " * 500, "max_tokens": 60})
        assert status == 422 and "exceeds the model's limit of 512 tokens" in body["detail"]
    finally:
        server.stop()
