"""Stage `bench-gen` (one run per entry of bench.generation.runs): prefill + decode, as a chat app generates.

Per prompt length P (bench.generation.prompt_lens, held-out text): warm-up, then timed greedy generations of G new
tokens. Time to first token = prompt in -> first new token's logits out; decode = every later token, one step each.
A `-nocache` run re-runs the whole prefix for every token (what a single-pass graph can do), for comparison.
Writes metrics/bench-gen/<run>.json: one block of figures per P (with `--device NAME`,
metrics/devices/<NAME>/bench-gen/<run>.json).
"""

from __future__ import annotations

import logging
import time

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, corpus
from antinet_npu.config import Config
from antinet_npu.measure.provenance import record
from antinet_npu.measure.timing import GenerationTracker
from antinet_npu.metrics import BENCH_GEN, device_root
from antinet_npu.runtime import generation
from antinet_npu.runtime.backends.registry import open_run

log = logging.getLogger("bench-gen")


def run(cfg: Config, run: str, device: str | None = None) -> dict:
    root = device_root(device)  # a bad device name fails before anything is measured
    gc_ = cfg.bench.generation
    if run not in gc_.runs:
        raise AntinetError(f"unknown generation run {run!r}: bench.generation.runs has {', '.join(gc_.runs)}")
    spec = gc_.runs[run]
    new_tokens = spec.new_tokens or gc_.new_tokens
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    tokenizer = checkpoint.load_text_tokenizer(snapshot)
    docs = corpus.split_documents(cfg.text)["eval"]
    prompts = {p: corpus.windows(tokenizer, docs, p, 1, "evaluation")[0] for p in gc_.prompt_lens}

    start = time.perf_counter()
    backend, _ = open_run(cfg, run)
    load_seconds = time.perf_counter() - start
    results = {}
    try:
        # a backend that samples for itself (Genie) times its own generations; the others hand out a stepper
        timed = getattr(backend, "timed_generate", None)
        stepper = None if timed else backend.stepper()
        if stepper is not None and not spec.cache:
            stepper = generation.RecomputeStepper(backend.run, stepper.context_length)
        context_length = stepper.context_length if stepper is not None else backend.context_length
        described = backend.describe()
        for p, prompt in prompts.items():
            generation.check_request(p, new_tokens, context_length)
            log.info("%s on %s, P=%d, G=%d%s: %d warm-up + %d timed generations", run, described["backend"], p,
                     new_tokens, "" if spec.cache else " (no KV cache)", gc_.warmup, gc_.iterations)
            tracker = GenerationTracker()
            for i in range(gc_.warmup + gc_.iterations):
                into = tracker if i >= gc_.warmup else GenerationTracker()
                if timed:
                    into.add(*timed(prompt, new_tokens))
                else:
                    into.generate(stepper, prompt, new_tokens)
            results[f"p{p}"] = tracker.stats()
            log.info("%s P=%d: TTFT %.1f ms, decode %.2f tokens/s (p50 %.2f ms, p90 %.2f ms per token), e2e %.0f ms",
                     run, p, results[f"p{p}"]["ttft_ms"], results[f"p{p}"]["decode_tokens_per_s"],
                     results[f"p{p}"]["p50_decode_ms_per_token"], results[f"p{p}"]["p90_decode_ms_per_token"],
                     results[f"p{p}"]["e2e_ms"])
    finally:
        backend.close()
    metrics = record(model=cfg.model.name, run=run, precision=spec.precision, **described, kv_cache=spec.cache,
                     new_tokens=new_tokens, warmup=gc_.warmup, load_seconds=round(load_seconds, 3), **results)
    BENCH_GEN.write(metrics, run, root)
    return metrics
