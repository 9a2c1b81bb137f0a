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

        status, body = server.request("/api/infer", {"token_ids": list(range(1, 31)), "max_new_tokens": 5})
        assert status == 422 and "exceeds the model's limit of 32 tokens" in body["detail"]

        status, body = server.get("/api/performance/benchmark?seq_lens=32")
        assert status == 200 and body["model"] == "tiny-qwen2" and body["emulated"] is True
        assert list(body["tests"][0]) == ["sequence_length", "avg_latency_ms", "min_latency_ms", "max_latency_ms",
                                          "throughput_qps"]
        status, body = server.get("/api/performance/benchmark")  # default 32,128: 128 does not fit
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
        assert status == 422 and "limited to 64" in body["detail"]

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
