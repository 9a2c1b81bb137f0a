"""Stage `export-npu-gen`: snapshot -> the NPU's static generation graphs, `models/npu-gen/<model>/`.

Per part (compile.generation.parts: embedding in the first, decoder layers split evenly, lm_head in the last) an
AR-N prefill graph and an AR-1 decode graph over the context CL (see `static_llm`), both reading one weights file
`part<i>.onnx.data`. Each part's weights are counted
before anything is written: a part over compile.generation.max_part_mb (at 8-bit weights) is refused. Checked before
it is kept: prefill + decode through the FP32 parts on the CPU give PyTorch generate()'s greedy tokens.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

import torch

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, onnx_export, onnx_models
from antinet_npu.build.static_llm import open_parts, plan_parts
from antinet_npu.config import Config
from antinet_npu.measure import fidelity
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import EXPORT_NPU_GEN
from antinet_npu.signature import Part
from antinet_npu.stages.export import check_greedy, greedy_reference, validation_prompts

log = logging.getLogger("export-npu-gen")


def part_params(model: torch.nn.Module, part: Part) -> int:
    """Weights a part's graph holds (a tied embedding counts in both the first and the last part)."""
    inner = model.model
    modules = [inner.layers[i] for i in part.layers]
    if part.embeds:
        modules.append(inner.embed_tokens)
    if part.head:
        modules += [inner.norm, model.lm_head]
    return sum(p.numel() for m in modules for p in m.parameters())


def weights_of(part: Part, tied: bool) -> Callable[[str], bool]:
    """Selects, by checkpoint name, the weights `part` runs on (a tied lm_head is the embedding)."""
    prefixes = [f"model.layers.{i}." for i in part.layers]
    if part.embeds:
        prefixes.append("model.embed_tokens.")
    if part.head:
        prefixes += ["model.norm.", "lm_head.", *(["model.embed_tokens."] if tied else [])]
    return lambda name: name.startswith(tuple(prefixes))


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    gen = cfg.compile.generation
    snapshot = artifacts.pytorch_dir(cfg.model.name)
    model = checkpoint.load_snapshot(snapshot)
    tokenizer, positions = checkpoint.load_text_tokenizer(snapshot), checkpoint.max_positions(model.config)
    if gen.context_length > positions:
        raise AntinetError(f"compile.generation.context_length {gen.context_length} exceeds the model's "
                           f"{positions} positions: lower it")
    parts = plan_parts(model.config.num_hidden_layers, gen.parts)
    sizes = [part_params(model, p) for p in parts]
    for part, n in zip(parts, sizes):
        if n / 1e6 > gen.max_part_mb:
            raise AntinetError(f"part {part.index} (layers {part.first_layer}-{part.first_layer + part.num_layers - 1}"
                               f") holds {n / 1e6:.0f} MB of 8-bit weights, over compile.generation.max_part_mb "
                               f"{gen.max_part_mb:g}: raise compile.generation.parts (now {gen.parts})")
    prompts = validation_prompts(cfg, tokenizer, gen.context_length)
    with torch.no_grad():
        greedy = greedy_reference(model, prompts, cfg.export.validate_new_tokens)
        expected = [model(input_ids=torch.from_numpy(p[None])).logits[0, -1].numpy() for p in prompts]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    del model  # each part is exported from a model holding only its own weights: the exporter copies them twice
    gc.collect()
    out = artifacts.npu_gen_dir(cfg.model.name)
    log.info("exporting %d parts x (AR-%d, AR-1) over a context of %d to %s", len(parts), gen.prefill_len,
             gen.context_length, out)
    with artifacts.staged_dir(out) as tmp:
        for part in parts:  # part by part: the AR-1 copy of a part's weights is on disk only until it is shared
            model = checkpoint.load_snapshot(snapshot, only=weights_of(part, tied))
            onnx_export.use_compact_attention(model)
            if cfg.compile.rmsnorm == "fused":
                onnx_export.fuse_rmsnorm(model)
            paths = [tmp / artifacts.npu_gen_part(cfg.model.name, ar, part.index).name for ar in (gen.prefill_len, 1)]
            for ar, path in zip((gen.prefill_len, 1), paths):
                onnx_export.export_part(model, part, path, ar, gen.context_length, cfg.compile.opset,
                                        cfg.compile.mask_value).write(path)
            del model
            gc.collect()
            weights = tmp / artifacts.npu_gen_weights(cfg.model.name, part.index).name
            onnx_models.share_weights(paths, weights)
            log.info("  part %d: %s over %s (%.1f MB)", part.index, ", ".join(p.name for p in paths), weights.name,
                     weights.stat().st_size / 1e6)
        export_seconds = time.perf_counter() - start
        stepper = open_parts({ar: [tmp / artifacts.npu_gen_part(cfg.model.name, ar, p.index).name for p in parts]
                              for ar in (gen.prefill_len, 1)}, onnx_models.cpu_session)
        got = [stepper.prefill(p) for p in prompts]
        error = fidelity.export_error((g[None], e[None], None) for g, e in zip(got, expected)) if prompts.size \
            else {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "top1_equal": 1.0}
        fidelity.check_export(error, cfg.export.max_rel_diff, cfg.export.min_top1, "the static generation parts",
                              "check compile.mask_value")
        check_greedy(stepper, prompts, greedy, "the static parts", "the KV slots or the mask are wired wrong")
        del stepper
    metrics = record(model=cfg.model.name, prefill_len=gen.prefill_len, context_length=gen.context_length,
                     opset=cfg.compile.opset, rmsnorm=cfg.compile.rmsnorm, num_parts=len(parts),
                     parts={f"part{p.index}": {"first_layer": p.first_layer, "num_layers": p.num_layers,
                             "embedding": p.embeds, "lm_head": p.head, "params": n,
                             "weight_mb_8bit": round(n / 1e6, 3),
                             "weights_mb": round(artifacts.npu_gen_weights(cfg.model.name, p.index).stat().st_size
                                                 / 1e6, 3),  # FP32, one file for both graphs
                             "graph_mb": {f"ar{ar}": round(artifacts.onnx_size_mb(artifacts.npu_gen_part(
                                 cfg.model.name, ar, p.index)), 3) for ar in (gen.prefill_len, 1)}}
                            for p, n in zip(parts, sizes)},
                     max_part_mb=gen.max_part_mb, **error, greedy_prompts_equal=len(prompts),
                     greedy_new_tokens=cfg.export.validate_new_tokens, export_seconds=round(export_seconds, 2),
                     seconds=round(time.perf_counter() - start, 2))
    EXPORT_NPU_GEN.write(metrics)
    log.info("%s: %d parts, largest %.0f MB of 8-bit weights; greedy generation equal to PyTorch on %d prompts x %d "
             "tokens, in %.1f s", out, len(parts), max(sizes) / 1e6, len(prompts), cfg.export.validate_new_tokens,
             metrics["seconds"])
    return metrics

