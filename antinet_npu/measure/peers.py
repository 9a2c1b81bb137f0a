"""A peer's build (onnxruntime-genai's, llama.cpp's) checked against ours before it is measured: greedy
continuations of held-out prompts, token for token, against our FP32 ONNX export (evaluate's protocol)."""

from __future__ import annotations

from typing import Callable

from antinet_npu import artifacts
from antinet_npu.build import checkpoint, corpus, onnx_models
from antinet_npu.config import Config
from antinet_npu.measure import fidelity
from antinet_npu.runtime import generation
from antinet_npu.signature import Signature


def greedy_agreement(cfg: Config, open_peer: Callable[[], object]) -> dict:
    """`open_peer()` gives the peer's generation stepper; it is opened once ours is freed (one model in memory)."""
    ev = cfg.evaluate
    snapshot, reference = artifacts.pytorch_dir(cfg.model.name), artifacts.onnx_path(cfg.model.name)
    tokenizer = checkpoint.load_text_tokenizer(snapshot)
    docs = corpus.split_documents(cfg.text)["eval"]
    prompts = corpus.generation_prompts(tokenizer, docs, ev.prompt_len, max(ev.gen_prompts, 1))
    ours = generation.OrtKvStepper(onnx_models.cpu_session(reference), Signature.read(reference))
    expected = [list(generation.generate(ours, p, ev.gen_tokens)) for p in prompts]
    del ours
    peer = open_peer()
    got = [list(generation.generate(peer, p, ev.gen_tokens)) for p in prompts]
    del peer
    return {**fidelity.generation_agreement(expected, got), "gen_prompts": len(prompts), "gen_tokens": ev.gen_tokens}
