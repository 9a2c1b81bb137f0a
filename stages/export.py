"""Stage `export`: `models/pytorch/<model>/` -> `models/onnx/<model>.onnx` (+ `.onnx.data`).

One graph with a KV cache (optimum's names: `input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.*` ->
`logits`, `present.{i}.*`; dynamic batch, sequence and past axes) serves both single passes (empty past) and
generation; its signature is written beside it. Before it is kept it is checked against PyTorch on held-out text: one
pass at two lengths and with left padding, and greedy generation token for token against `generate()`.
"""

from __future__ import annotations

import gc
import logging
import time

import numpy as np
import torch

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, corpus, onnx_export, onnx_models
from antinet_npu.config import Config
from antinet_npu.measure import fidelity
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import EXPORT
from antinet_npu.runtime import generation

log = logging.getLogger("export")


def validation_batches(cfg: Config, tokenizer, max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, attention_mask) pairs of held-out text: batch 2, full and shorter length, one left-padded row."""
    seq = min(cfg.export.validate_seq_len, max_len)
    ids = corpus.windows(tokenizer, corpus.split_documents(cfg.text)["eval"], seq, 2 * cfg.export.validate_batches,
                         "evaluation")
    batches = []
    for i in range(cfg.export.validate_batches):
        length = seq if i % 2 == 0 else seq // 2 + 1
        batch = ids[2 * i: 2 * i + 2, :length]
        mask = np.ones_like(batch)
        if i == 1:
            mask[0, : length // 4] = 0  # left padding, as a batched generate() would feed
        batches.append((batch, mask))
    return batches


def validation_prompts(cfg: Config, tokenizer, max_len: int) -> np.ndarray:
    """Held-out prompts for the greedy-generation check (other text than the single-pass batches)."""
    prompt_len = max(1, min(cfg.export.validate_prompt_len, max_len - cfg.export.validate_new_tokens))
    docs = corpus.split_documents(cfg.text)["eval"]
    ids = corpus.windows(tokenizer, docs, prompt_len, 2 * cfg.export.validate_batches + cfg.export.validate_prompts,
                         "evaluation")
    return ids[-cfg.export.validate_prompts:]


def greedy_reference(model, prompts: np.ndarray, new_tokens: int) -> list[list[int]]:
    """PyTorch `generate(do_sample=False)`: exactly `new_tokens` tokens per prompt (EOS does not stop it)."""
    model.generation_config.eos_token_id = None  # a local copy of the model: the snapshot is not changed
    out = []
    for prompt in prompts:
        ids = torch.from_numpy(prompt[None])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def check_greedy(stepper, prompts: np.ndarray, greedy: list[list[int]], what: str, hint: str) -> None:
    """Greedy generation through `stepper` must give PyTorch's tokens (`greedy_reference`) for every prompt."""
    for prompt, ref in zip(prompts, greedy):
        got = list(generation.generate(stepper, prompt, len(ref)))
        if got != ref:
            first = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
            raise AntinetError(f"greedy generation through {what} departs from PyTorch generate() at new token "
                               f"{first} of {len(ref)}: {hint}")


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    model = checkpoint.load_snapshot(snapshot)
    tokenizer, context = checkpoint.load_text_tokenizer(snapshot), checkpoint.max_positions(model.config)
    batches = validation_batches(cfg, tokenizer, context)
    prompts = validation_prompts(cfg, tokenizer, context)
    with torch.no_grad():
        expected = [model(input_ids=torch.from_numpy(i), attention_mask=torch.from_numpy(m),
                          position_ids=torch.from_numpy(np.clip(np.cumsum(m, -1) - 1, 0, None)), use_cache=False)
                    .logits.numpy() for i, m in batches]
        greedy = greedy_reference(model, prompts, cfg.export.validate_new_tokens)
    out = artifacts.onnx_path(cfg.model.name)
    log.info("exporting %s to ONNX with a KV cache (opset %d)", snapshot, cfg.export.opset)
    with artifacts.staged_files(out.parent) as tmp:
        signature = onnx_export.export_dynamic(model, tmp / out.name, cfg.export.opset, context)
        export_seconds = time.perf_counter() - start
        del model
        gc.collect()
        session = onnx_models.cpu_session(tmp / out.name)
        error = fidelity.export_error((onnx_models.run_logits(session, signature, i, m), ref, m)
                                      for (i, m), ref in zip(batches, expected))
        fidelity.check_export(error, cfg.export.max_rel_diff, cfg.export.min_top1, "the exported ONNX model",
                              "try another export.opset")
        stepper = generation.OrtKvStepper(session, signature)
        check_greedy(stepper, prompts, greedy, "the exported KV cache", "the cache inputs/outputs are wired wrong")
        del session, stepper
        signature.write(tmp / out.name)
    metrics = record(model=cfg.model.name, opset=cfg.export.opset, kv_cache=True, **error,
                     validated_batches=len(batches), greedy_prompts_equal=len(prompts),
                     greedy_new_tokens=cfg.export.validate_new_tokens,
                     size_mb=round(artifacts.onnx_size_mb(out), 3), export_seconds=round(export_seconds, 2),
                     seconds=round(time.perf_counter() - start, 2))
    EXPORT.write(metrics)
    log.info("%s (%.1f MB), max |logits - PyTorch| %.2e (%.1e of their scale) over %d batches, greedy generation "
             "equal to PyTorch on %d prompts x %d tokens, in %.1f s", out, metrics["size_mb"], error["max_abs_diff"],
             error["max_rel_diff"], len(batches), len(prompts),
             cfg.export.validate_new_tokens, metrics["seconds"])
    return metrics
