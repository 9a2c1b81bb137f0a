"""The serving pieces without a model or a server: prefix cache, text assembly, request bodies, the engine's queue,
cancel and deadline (over a stepper that counts its calls)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pydantic import ValidationError

from antinet_npu.config import Config
from antinet_npu.runtime import openai_api as oa
from antinet_npu.runtime.engine import Engine, Failed, Finished, ModelHost, QueueFull, Started
from antinet_npu.runtime.generation import Sampling, Snapshot
from antinet_npu.runtime.prefix_cache import PrefixCache


def snap(n: int, nbytes: int = 10) -> Snapshot:
    return Snapshot(n, f"state-{n}", nbytes)


def test_prefix_cache_takes_the_longest_strict_prefix_and_evicts_least_recently_used():
    cache = PrefixCache(max_bytes=30)
    cache.put([1, 2], snap(2))
    cache.put([1, 2, 3, 4], snap(4))
    assert cache.lookup([1, 2, 3, 4, 5]).tokens == (1, 2, 3, 4)
    assert cache.lookup([1, 2, 3, 4]).tokens == (1, 2)  # one token must remain to run
    assert cache.lookup([1, 9]) is None and cache.lookup([1]) is None
    cache.put([7], snap(1))              # 30 bytes: full
    cache.lookup([1, 2, 3])              # [1, 2] used: [1, 2, 3, 4] is now the oldest
    cache.put([8], snap(1))
    assert cache.nbytes == 30 and len(cache) == 3 and cache.lookup([1, 2, 3, 4, 5]).tokens == (1, 2)
    cache.put([5, 5], snap(2, nbytes=31))  # larger than the whole cache: not kept
    cache.put([6], snap(2))                # does not hold its tokens: not kept
    assert cache.nbytes == 30 and cache.lookup([5, 5, 1]) is None and cache.lookup([6, 1]) is None


class CharTokenizer:
    """One character per token; 0xFFFD for an incomplete one (token 0 = half of a character)."""

    def decode(self, tokens, skip_special_tokens=True):
        return "".join("\ufffd" if t == 0 else chr(t) for t in tokens)


def assemble(text: str, stop: list[str]) -> tuple[list[str], bool]:
    asm = oa.TextAssembler(CharTokenizer(), stop)
    deltas = []
    for ch in text:
        deltas.append(asm.add(ord(ch)))
        if asm.stopped:
            break
    deltas.append(asm.finish())
    return deltas, asm.stopped


def test_text_deltas_concatenate_to_the_answer_cut_before_a_stop_string():
    deltas, stopped = assemble("hello world", ["o w"])
    assert "".join(deltas) == "hell" and stopped
    deltas, stopped = assemble("hello", ["lox"])  # a held-back tail is released at the end
    assert "".join(deltas) == "hello" and not stopped and deltas[2] == ""  # "l" held back after "hel"
    asm = oa.TextAssembler(CharTokenizer(), [])
    assert asm.add(0) == "" and asm.finish() == "\ufffd"  # an incomplete character waits for the next token


def test_request_bodies_defaults_nulls_and_rejections():
    req = oa.CompletionRequest(prompt="x", n=None, top_p=None, temperature=None, max_tokens=None, stop="")
    assert req.new_tokens == 16 and req.stops(4) == [] and req.sampling().temperature == 1.0
    assert oa.CompletionRequest(prompt="x", max_tokens=5, max_completion_tokens=9).new_tokens == 9
    assert oa.CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert oa.CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert oa.CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert oa.CompletionRequest(prompt="x", seed=-1).sampling().seed == 2**64 - 1
    chat = oa.ChatRequest(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]}])
    assert chat.messages[0].as_dict() == {"role": "system", "content": "ab"}
    for bad in ({"prompt": "\udfff"}, {"prompt": "x", "n": 2}, {"prompt": "x", "top_p": 0.5},
                {"prompt": "x", "logprobs": 1}, {"prompt": []}, {"prompt": "x", "stop": ["\udfff"]}):
        with pytest.raises(ValidationError):
            oa.CompletionRequest(**bad)
    for bad in ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
                {"messages": [{"role": "user", "content": "a\udfffb"}]},
                {"messages": [{"role": "user", "content": "a"}], "logprobs": True}):
        with pytest.raises(ValidationError):
            oa.ChatRequest(**bad)
    with pytest.raises(Exception, match="at most 2 are allowed"):
        oa.CompletionRequest(prompt="x", stop=["a", "b", "c"]).stops(2)


def test_a_tiny_temperature_samples_the_best_token_not_nan():
    logits = np.array([1.0, 3.0, 2.0], np.float32)
    pick = Sampling(temperature=1e-310, seed=0).picker()
    assert {pick(logits) for _ in range(20)} == {1}


class CountingStepper:
    """A session whose logits always favour token (last + 1); counts decode steps."""

    context_length = 1000

    def __init__(self, step_s: float = 0.0):
        self.step_s, self.steps, self.ids = step_s, 0, []

    @property
    def length(self):
        return len(self.ids)

    def _logits(self):
        out = np.zeros(100, np.float32)
        out[(self.ids[-1] + 1) % 100] = 1
        return out

    def prefill(self, prompt):
        self.ids = [int(t) for t in prompt]
        return self._logits()

    def extend(self, tokens):
        self.ids += [int(t) for t in tokens]
        return self._logits()

    def decode(self, token):
        time.sleep(self.step_s)
        self.steps += 1
        self.ids.append(int(token))
        return self._logits()

    def snapshot(self):
        return Snapshot(len(self.ids), list(self.ids), 8 * len(self.ids))

    def restore(self, s):
        self.ids = list(s.state)


def make_engine(step_s=0.0, **serve) -> Engine:
    cfg = Config()
    for key, value in {"max_queue": 2, "prefix_cache_mb": 1, **serve}.items():
        setattr(cfg.serve, key, value)
    host = ModelHost(cfg)
    host.stepper, host.status, host.eos_ids, host.vocab_size = CountingStepper(step_s), "ready", (), 100
    return Engine(host)


async def drain(job):
    items = []
    while not isinstance(item := await job.out.get(), (Finished, Failed)):
        items.append(item)
    return items, item


def test_engine_generates_resumes_from_the_cache_and_stops_on_cancel_and_deadline():
    async def scenario():
        loop = asyncio.get_running_loop()
        engine = make_engine(step_s=0.02)
        try:
            job = engine.submit(lambda j: engine.generate(j, [1, 2, 3], 5, Sampling()), loop, 60)
            items, end = await drain(job)
            assert [i for i in items if isinstance(i, int)] == [4, 5, 6, 7, 8] and end.reason == "length"
            assert items[0].cached_tokens == 0
            # the next prompt extends the first answer: resumed from the cached session
            job = engine.submit(lambda j: engine.generate(j, [1, 2, 3, 4, 5, 6, 7, 8, 9], 2, Sampling()), loop, 60)
            items, end = await drain(job)
            assert isinstance(items[0], Started) and items[0].cached_tokens == 7  # the answer but its last token
            assert [i for i in items if isinstance(i, int)] == [10, 11]

            stepper = engine.host.stepper
            job = engine.submit(lambda j: engine.generate(j, [50], 500, Sampling()), loop, 60)
            while not isinstance(await job.out.get(), int):
                pass
            before = stepper.steps
            job.cancel()
            items, end = await drain(job)
            assert end.reason == "cancelled" and stepper.steps - before <= 1  # freed within one decode step

            job = engine.submit(lambda j: engine.generate(j, [50], 500, Sampling()), loop, 0.2)
            items, end = await drain(job)
            assert end.reason == "timeout" and 0 < len([i for i in items if isinstance(i, int)]) < 500
        finally:
            engine.stop(5)

    asyncio.run(scenario())


def test_engine_queue_is_bounded_and_gone_requests_never_reach_the_model():
    async def scenario():
        loop = asyncio.get_running_loop()
        engine = make_engine(step_s=0.05, max_queue=1)
        try:
            running = engine.submit(lambda j: engine.generate(j, [1], 40, Sampling()), loop, 60)
            await running.out.get()  # started: the queue is empty again
            queued = engine.submit(lambda j: engine.generate(j, [2], 4, Sampling()), loop, 60)
            with pytest.raises(QueueFull) as full:
                engine.submit(lambda j: engine.generate(j, [3], 4, Sampling()), loop, 60)
            assert full.value.retry_after_s >= 1
            queued.cancel()
            running.cancel()
            assert (await drain(queued)) == ([], Finished("cancelled"))
        finally:
            engine.stop(5)

    asyncio.run(scenario())
