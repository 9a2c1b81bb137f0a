"""`antinet-npu serve`: the real server on a loopback port, spoken to over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
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
        # its log goes to a file: a pipe nobody reads until the end fills up, and a server writing to it blocks
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "antinet_npu", "serve", "--port", str(self.port),
                                      *TEST_OVERRIDES, *overrides], cwd=project, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the server answers before the model is loaded
            try:
                self.get("/api/health")
                return
            except (urllib.error.URLError, ConnectionError):
                assert self.proc.poll() is None, self.output()
                time.sleep(0.1)
        raise AssertionError("server did not start")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

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
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        return self.output()


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

        kind, events = server.stream("/v1/chat/completions", _chat(server, stream=True,
                                                                   stream_options={"include_usage": True}))
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


def _raw(server, path, body: bytes, method="POST"):
    """(status, headers, JSON body) without urllib's error handling in the way."""
    req = urllib.request.Request(server.url + path, data=body if method == "POST" else None, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def _open_stream(server, body: dict) -> socket.socket:
    """A streamed completion on a raw socket, its first event read: the caller decides when to hang up."""
    data = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    assert b"200 OK" in sock.recv(4096)
    return sock


def _stats(server) -> dict:
    return server.get("/api/stats")[1]


def test_limits_disconnect_queue_caps_and_bad_input(pipeline):
    # a generation run (bench.generation.runs) served through its KV session
    server = Server(pipeline.path, "serve.run=ort-cpu-fp32", "serve.warmup=1", "serve.max_queue=2",
                    "serve.max_body_kb=64")
    try:
        health = server.wait_ready()
        assert health["backend"] == "ort-cpu" and health["kv_cache"] is True

        # a client that hangs up mid-stream frees the model: the next request is answered at once (bound: 30 s;
        # before, it waited for Python's garbage collector, 60 to 204 s)
        sock = _open_stream(server, {"prompt": "Return the value of", "max_tokens": 64,
                                     "stop": [f"never-{i}" for i in range(16)]})
        sock.close()
        start = time.monotonic()
        req = urllib.request.Request(server.url + "/v1/completions", headers={"content-type": "application/json"},
                                     data=json.dumps({"prompt": "x", "max_tokens": 2}).encode())
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200
        print(f"answered {time.monotonic() - start:.3f} s after a client hung up mid-stream")
        deadline = time.monotonic() + 10
        while _stats(server)["outcomes"]["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _stats(server)["outcomes"]["cancelled"] == 1

        # a full queue answers 429 with Retry-After; nobody waits without bound
        barrier = __import__("threading").Barrier(24)

        def call(_):
            barrier.wait()
            return _raw(server, "/v1/completions", json.dumps({"prompt": "Return the value of", "max_tokens": 48,
                                                               "temperature": 0}).encode())
        with ThreadPoolExecutor(max_workers=24) as pool:
            results = list(pool.map(call, range(24)))
        statuses = sorted(r[0] for r in results)
        assert set(statuses) == {200, 429} and statuses.count(429) >= 1, statuses
        busy = next(r for r in results if r[0] == 429)
        assert int(busy[1]["retry-after"]) >= 1 and "serve.max_queue" in busy[2]["detail"]

        # sizes are checked before anything is tokenized
        status, _, body = _raw(server, "/v1/completions", json.dumps({"prompt": "x " * 40000}).encode())
        assert status == 413 and "serve.max_body_kb" in body["detail"]
        status, _, body = _raw(server, "/v1/completions", json.dumps({"prompt": "x", "stop": ["a"] * 17}).encode())
        assert status == 422 and "serve.max_stop" in body["detail"]

        # 422, never 500 or a 200 with a cut stream
        for path, raw in (("/v1/completions", b'{"prompt": "\\udfff"}'),
                          ("/v1/completions", b'{"prompt": "\\udfff", "stream": true}'),
                          ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}'),
                          ("/api/infer", b'{"text": "\\udfff"}'),
                          ("/v1/completions", b'{"prompt": "x", "logprobs": 2}'),
                          ("/v1/completions", b'{"prompt": "x", "n": 3, "stream": true}')):
            status, _, body = _raw(server, path, raw)
            assert status == 422, (path, raw, body)
        assert "unpaired surrogate" in _raw(server, "/api/infer", b'{"text": "\\udfff"}')[2]["detail"][0]["msg"]

        # what clients send: nulls as defaults, an empty stop ignored, max_completion_tokens, odd but valid values
        plain = server.request("/v1/completions", {"prompt": "Return the", "max_tokens": 6, "temperature": 0})[1]
        for extra in ({"stop": ""}, {"stop": [""]}, {"n": None, "top_p": None, "seed": None}):
            status, same = server.request("/v1/completions", {"prompt": "Return the", "max_tokens": 6,
                                                              "temperature": 0, **extra})
            assert status == 200 and same["choices"][0]["text"] == plain["choices"][0]["text"], extra
        status, body = server.request("/v1/completions", {"prompt": "Return the", "max_completion_tokens": 6,
                                                          "temperature": 0})
        assert body["choices"][0]["text"] == plain["choices"][0]["text"]
        for odd in ({"seed": -1, "temperature": 0.7}, {"temperature": 1e-310}):
            status, body = server.request("/v1/completions", {"prompt": "Return the", "max_tokens": 4, **odd})
            assert status == 200, (odd, body)
        status, body = server.request("/v1/completions", {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3})
        assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
        assert body["usage"]["prompt_tokens"] == 5
        status, body = server.request("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Return"}, {"type": "text", "text": " the"}]}], "max_tokens": 3})
        assert status == 200
    finally:
        log = server.stop()
    assert "Traceback" not in log, log


def test_prefix_cache_openai_client_metrics_and_dashboard(pipeline, tmp_path):
    import contextlib
    import shutil

    import numpy as np
    from openai import OpenAI
    from prometheus_client.parser import text_string_to_metric_families

    from antinet_npu.config import load
    from antinet_npu.runtime import generation
    from antinet_npu.runtime.backends.registry import open_run

    server = Server(pipeline.path, "serve.run=ort-cpu-fp32", "serve.warmup=1", "serve.bench_every_s=1")
    try:
        server.wait_ready()
        # a second turn resumes from the first one's session, and generates exactly what a fresh session would
        history = [(7 * k) % 1900 + 3 for k in range(300)]
        status, first = server.request("/api/infer", {"token_ids": history, "max_new_tokens": 8})
        assert status == 200 and first["cached_tokens"] == 0
        turn = history + first["continuation"]["token_ids"] + [11, 12, 13]
        status, second = server.request("/api/infer", {"token_ids": turn, "max_new_tokens": 8})
        assert second["cached_tokens"] == len(history) + 7  # all but the last token of the first answer
        with contextlib.chdir(pipeline.path):  # artifacts are found relative to the project
            backend, _ = open_run(load("params.yaml"), "ort-cpu-fp32")
            fresh = list(generation.generate(backend.stepper(), np.array(turn), 8))
        assert second["continuation"]["token_ids"] == fresh
        print(f"second turn of {len(turn)} tokens: first forward {second['first_forward_ms']:.1f} ms resumed from "
              f"the cache vs {first['first_forward_ms']:.1f} ms for the first turn's {len(history)} tokens")

        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        assert [m.id for m in client.models.list()] == ["tiny-qwen2"]
        messages = [{"role": "user", "content": "Return the value of"}]
        chunks = list(client.chat.completions.create(model="tiny-qwen2", messages=messages, max_tokens=8,
                                                     temperature=0, stream=True))
        assert all(c.choices for c in chunks)  # no usage chunk unless asked: chunk.choices[0] always works
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        whole = client.chat.completions.create(model="tiny-qwen2", messages=messages, max_tokens=8, temperature=0)
        assert text == whole.choices[0].message.content and whole.usage.completion_tokens > 0
        chunks = list(client.chat.completions.create(model="tiny-qwen2", messages=messages, max_tokens=8,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens

        status, body = server.request("/v1/completions", {"prompt": "x", "n": None, "top_p": None})
        assert status == 200
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        count = {name: next(s.value for s in families[name].samples if s.name.endswith("_count"))
                 for name in ("antinet_ttft_seconds", "antinet_decode_step_seconds", "antinet_request_seconds")}
        assert all(v > 0 for v in count.values()), count
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
        assert samples[("antinet_tokens_total", (("direction", "out"),))] > 0
        assert samples[("antinet_prefix_cache_hits_total", ())] >= 1
        assert samples[("antinet_model_requests_total", (("outcome", "answered"),))] >= 6
        deadline = time.monotonic() + 30  # the idle-time benchmark runs once nothing came for bench_every_s
        while time.monotonic() < deadline and not (_stats(server)["bench"] or {}).get("decode_tokens_per_s"):
            time.sleep(0.5)
        assert _stats(server)["bench"]["ttft_ms"] > 0
        info = next(s.labels for s in families["antinet_model_info"].samples)
        assert info["backend"] == "ort-cpu" and info["emulated"] == "False"

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            pytest.skip("no Chromium for the dashboard screenshot: apt-get install chromium (.ci/run does)")
        shot = tmp_path / "dashboard.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1280,760", "--virtual-time-budget=4000", f"--screenshot={shot}",
                        server.url + "/dashboard"], check=True, capture_output=True, timeout=120)
        from PIL import Image

        pixels = list(Image.open(shot).convert("RGB").getdata())
        series = {name: sum(1 for p in pixels if all(abs(a - b) <= 8 for a, b in zip(p, rgb)))
                  for name, rgb in (("ttft", (31, 119, 180)), ("budget", (214, 39, 40)), ("tps", (44, 160, 44)))}
        assert all(n > 100 for n in series.values()), series  # each plotted series drew its line and points
    finally:
        server.stop()


def test_load_run_sigterm_and_port_in_use(pipeline):
    import random
    import threading

    server = Server(pipeline.path, "serve.run=ort-cpu-fp32", "serve.warmup=1", "serve.max_queue=4",
                    "serve.prefix_cache_mb=8", "serve.drain_s=5")
    sent = {"n": 0}
    lock = threading.Lock()

    def client(seed: int, seconds: float):
        rng = random.Random(seed)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            body = {"prompt": "Return the value of " * rng.randint(1, 20), "max_tokens": rng.randint(4, 48)}
            with lock:
                sent["n"] += 1
            try:
                if rng.random() < 0.4:  # hang up after the first event
                    _open_stream(server, body).close()
                else:
                    req = urllib.request.Request(server.url + "/v1/completions", headers={"content-type":
                                                 "application/json"}, data=json.dumps(
                                                     {**body, "stream": rng.random() < 0.5}).encode())
                    with urllib.request.urlopen(req, timeout=120) as resp:
                        resp.read()
            except AssertionError:  # 429 on the raw socket: counted by the server as rejected
                time.sleep(0.05)
            except urllib.error.HTTPError as err:
                assert err.code == 429, err.read()
                time.sleep(0.05)  # a client that backs off a little (Retry-After asks for whole seconds)

    def load(seconds: float):
        threads = [threading.Thread(target=client, args=(i, seconds)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = _stats(server)
            if sum(stats["outcomes"].values()) == sent["n"] and not stats["in_flight"]:
                return stats
            time.sleep(0.2)
        raise AssertionError(f"counters do not add up: {stats['outcomes']} vs {sent['n']} sent")

    try:
        server.wait_ready()
        warm = load(4)
        after = load(12)
        o = after["outcomes"]
        print(f"load run: {sent['n']} requests, {o}; RSS {warm['rss_mb']} MB after warm-up, {after['rss_mb']} MB "
              f"after 12 s of 8 clients")
        assert o["failed"] == 0 and o["timeout"] == 0 and o["cancelled"] > 0 and o["answered"] > 0
        assert after["rss_mb"] - warm["rss_mb"] < 48  # flat: the 8 MB cache and allocator slack, no leak
        status, body = server.request("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 200

        # a second server on the same port: one line, exit 1, nothing printed as if it served
        taken = subprocess.run([sys.executable, "-m", "antinet_npu", "serve", "--port", str(server.port),
                                *TEST_OVERRIDES], cwd=pipeline.path, capture_output=True, text=True, timeout=120)
        assert taken.returncode == 1 and "choose another port" in taken.stderr and "serving" not in taken.stderr

        # SIGTERM during a stream: drains (serve.drain_s), then exits 0
        sock = _open_stream(server, {"prompt": "Return the value of", "max_tokens": 64})
        server.proc.terminate()
        assert server.proc.wait(timeout=5 + 30) == 0
        sock.close()
    finally:
        log = server.stop()
    assert "stopped" in log and "Traceback" not in log, log
