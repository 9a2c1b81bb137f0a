"""Stage `compile-gen` (matrix over compile.generation.precisions): the NPU generation parts -> QNN context binaries.

Per part: static QDQ of its AR-N and AR-1 graphs, calibrated on real traces (the FP32 parts prefilling calibration
prompts, then decoding `calib_new_tokens` greedy tokens: each graph sees the inputs it gets in generation, KV cache
included); each graph compiled alone into `verify/` (every node must land in QNN); then both into one context binary
over one copy of the weights (`ep.share_ep_contexts`), the binary shipped for the device. The x86_64 emulator cannot
load a shared binary (it crashes), so the graphs are verified from the unshared binaries of the very same QDQ models:
teacher-forced fidelity on held-out windows and greedy generation vs the FP32 parts, labelled `emulated`.
A recipe with method fp16 skips calibration and QDQ: the float graphs themselves, compiled at fp16 precision, with
float32 I/O (the float reference on the NPU: its greedy tokens are what a quantized recipe's are judged against).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, corpus, onnx_models, qnn, quantization, sensitivity
from antinet_npu.build.static_llm import check_built_for, open_parts, trace_generation
from antinet_npu.config import Config
from antinet_npu.measure import fidelity
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import COMPILE_GEN
from antinet_npu.runtime import cores, generation
from antinet_npu.signature import Signature

log = logging.getLogger("compile-gen")


def run(cfg: Config, precision: str) -> dict:
    cc, gen = cfg.compile, cfg.compile.generation
    qnn.require()
    if precision not in cc.recipes:
        raise AntinetError(f"unknown NPU precision {precision!r}: valid ones are {', '.join(cc.recipes)}")
    recipe, model = cc.recipes[precision], cfg.model.name
    n = gen.prefill_len
    fp32 = {ar: [artifacts.npu_gen_part(model, ar, i) for i in range(gen.parts)] for ar in (n, 1)}
    for path in (p for paths in fp32.values() for p in paths):
        if not path.is_file():
            raise AntinetError(f"{path} not found: run `dvc repro export-npu-gen` first")
        check_built_for(path, Signature.read(path), n, gen.context_length, gen.parts, "export-npu-gen")
    snapshot = artifacts.pytorch_dir(model)
    tokenizer = checkpoint.load_text_tokenizer(snapshot)
    # Calibration prompts of 1.5 chunks: a left-padded chunk and a full one, so the traces hold both
    calib = corpus.calibration_windows(tokenizer, cfg.text, n + n // 2, cc.calib_samples)
    held_out = [(domain, w) for domain, rows in corpus.evaluation_windows(
        tokenizer, cfg.text, min(2 * n, gen.context_length), cc.verify_windows(precision)).items() for w in rows]
    prompts = [(domain, p) for domain, rows in corpus.held_out_prompts(
        tokenizer, cfg.text, min(n, gen.context_length - gen.verify_new_tokens), gen.verify_prompts).items()
        for p in rows]

    start = time.perf_counter()
    traces: dict = {}
    if not recipe.fp16:  # fp16 quantizes nothing: no calibration
        trace_generation(open_parts(fp32, onnx_models.cpu_session, traces), calib, gen.calib_new_tokens)
        log.info("calibration traces: %d prompts x (prefill + %d decode steps): %s (%.0f MB kept)", len(calib),
                 gen.calib_new_tokens,
                 ", ".join(f"AR-{ar} part {i}: {len(v)}" for (ar, i), v in sorted(traces.items())),
                 sum(x.nbytes for v in traces.values() for t in v for x in t.feeds.values()) / 1e6)

    # one encoding per tensor that several graphs read or write (a layer's cache: in and out, AR-N and AR-1; the
    # hidden state between two parts; the mask and rotary tables every graph takes): integer I/O then passes from one
    # graph to the next as raw bytes, and Genie, which fills one buffer per name, refuses anything else ("Non-identical
    # quantization parameters found for the same tensor")
    first = Signature.read(fp32[n][0])
    quantized_io = gen.quantized_io and not recipe.fp16  # fp16: float32 I/O, as the float graph has it
    ranges = _shared_ranges(traces, first.mask_value, first.rope.scaling) if quantized_io else {}
    float_edges = ("hidden_states_",) if recipe.float_residual else ()  # the residual stream stays float by design
    ranges = {k: v for k, v in ranges.items() if not k.startswith(float_edges or ("\0",))}
    encodings: dict[tuple[int, int], dict] = {}
    out = artifacts.qnn_gen_dir(model, precision)
    parts_metrics = {}
    part_nodes = [quantization.weight_groups(fp32[n][i], ("MatMul",)) for i in range(gen.parts)]
    # a mixed recipe keeps the model's N most sensitive groups (as the single-pass graph does), wherever they live
    kept = sensitivity.kept_groups(recipe.mixed, model, [g for nodes in part_nodes for g in nodes])
    with artifacts.staged_dir(out) as tmp:
        (tmp / "verify").mkdir()
        outliers: dict[str, list[str]] = {}
        for i, nodes in enumerate(part_nodes):
            groups = [g for g in kept if g in nodes]
            keep = [name for g in groups for name in nodes[g]]
            # found on the prefill traces (where the massive activations are: the first tokens), applied to AR-N and
            # AR-1 alike: the two graphs share one copy of the weights
            found = quantization.recipe_outliers(fp32[n][i], recipe, (t.full() for t in traces.get((n, i), ())))
            outliers.update(found)
            part = {"quantize_seconds": 0.0, "compile_seconds": 0.0, "cpu_compute_nodes": 0, "compute_nodes": 0}
            for ar in (n, 1):
                t = time.perf_counter()
                qdq_model = onnx.load(fp32[ar][i]) if recipe.fp16 else \
                    quantization.qdq_static(fp32[ar][i], recipe, (t.full() for t in traces.pop((ar, i))), keep, ranges,
                                            found)
                encodings[ar, i] = quantization.quantized_io(qdq_model, float_edges) if quantized_io else {}
                part["compute_nodes"] += sum(x.op_type not in qnn.BOUNDARY_OPS for x in qdq_model.graph.node)
                qdq = artifacts.qnn_gen_qdq(tmp, ar, i)
                onnx_models.save(qdq_model, qdq)
                signature = replace(Signature.read(fp32[ar][i]), quantized_io=encodings[ar, i] or None)
                signature.write(qdq)
                del qdq_model
                gc.collect()
                part["quantize_seconds"] += time.perf_counter() - t
                t = time.perf_counter()
                ctx = artifacts.qnn_gen_ctx(tmp, ar, i, verify=True)
                qnn.compile_context(qdq, ctx, cfg.target, cc.allow_cpu_fallback, recipe.fp16)
                part["cpu_compute_nodes"] += len(qnn.nodes_outside_context(ctx)[1])
                qnn.name_graphs({ctx: signature.part.graph_name(ar, gen.context_length)})
                signature.write(ctx)
                part["compile_seconds"] += time.perf_counter() - t
            unshared = sum(b.stat().st_size for ar in (n, 1)
                           for b in qnn.context_binaries(artifacts.qnn_gen_ctx(tmp, ar, i, verify=True)))
            t = time.perf_counter()
            shipped = [artifacts.qnn_gen_ctx(tmp, ar, i) for ar in (n, 1)]
            if gen.share:
                qnn.compile_shared([artifacts.qnn_gen_qdq(tmp, ar, i) for ar in (n, 1)], shipped, cfg.target,
                                   recipe.fp16)
            else:
                for ar, ctx in zip((n, 1), shipped):
                    qnn.compile_context(artifacts.qnn_gen_qdq(tmp, ar, i), ctx, cfg.target, cc.allow_cpu_fallback,
                                        recipe.fp16)
            qnn.name_graphs({ctx: Signature.read(fp32[ar][i]).part.graph_name(ar, gen.context_length)
                             for ar, ctx in zip((n, 1), shipped)})
            for k, (ar, ctx) in enumerate(zip((n, 1), shipped)):  # graph k of the part's binary: compile order
                replace(Signature.read(fp32[ar][i]), context_graph=k if gen.share else 0,
                        quantized_io=encodings[ar, i] or None).write(ctx)
            bins = sorted({b for ctx in shipped for b in qnn.context_binaries(ctx)})
            part["compile_seconds"] += time.perf_counter() - t
            parts_metrics[f"part{i}"] = {
                **{k: round(v, 2) if isinstance(v, float) else v for k, v in part.items()},
                "bin_mb": round(sum(b.stat().st_size for b in bins) / 1e6, 3), "bins": len(bins),
                "unshared_bin_mb": round(unshared / 1e6, 3),
                "qdq_mb": round(sum(artifacts.onnx_size_mb(artifacts.qnn_gen_qdq(tmp, ar, i)) for ar in (n, 1)), 3),
                "kept_groups": len(groups), "float_outliers": len(found)}
            log.info("part %d: %s (%.1f MB, shared) vs %.1f MB unshared", i, ", ".join(b.name for b in bins),
                     parts_metrics[f"part{i}"]["bin_mb"], unshared / 1e6)
        _check_shared_encodings(encodings, {(ar, i): [*Signature.read(fp32[ar][i]).inputs,
                                                      *Signature.read(fp32[ar][i]).outputs]
                                            for ar in (n, 1) for i in range(gen.parts)})
        build_seconds = time.perf_counter() - start

        start = time.perf_counter()
        jobs = [("score", w) for _, w in held_out] + [("generate", p) for _, p in prompts]
        workers = min(qnn.verify_workers(cc.verify_workers), len(jobs))
        log.info("verifying on the QNN HTP backend%s from the unshared binaries: %d held-out windows, %d prompts x %d "
                 "tokens, %d process(es)", " (emulator)" if qnn.emulated() else "", len(held_out), len(prompts),
                 gen.verify_new_tokens, workers)
        npu = _NpuParts(qnn.HtpGraphs(cfg.target, cc.allow_cpu_fallback), gen.verify_new_tokens,
                        {ar: [artifacts.qnn_gen_ctx(tmp, ar, i, verify=True) for i in range(gen.parts)]
                         for ar in (n, 1)})
        answers = cores.spread(npu, jobs, workers)
        npu.graphs.close()
        reference = open_parts(fp32, onnx_models.cpu_session)
        meter = fidelity.DomainMeter()
        for (domain, window), logits in zip(held_out, answers[:len(held_out)]):
            meter.add(domain, reference.score(window)[None], logits[None], window[None])
        expected = [list(generation.generate(reference, p, gen.verify_new_tokens)) for _, p in prompts]
        got = [list(map(int, g)) for g in answers[len(held_out):]]
        for domain in dict(prompts):
            mine = [i for i, (d, _) in enumerate(prompts) if d == domain]
            meter.add_greedy(domain, [expected[i] for i in mine], [got[i] for i in mine])
        # what Genie's verification (stage genie) compares with: the same prompts through the FP32 parts and
        # through our host loop over these binaries
        artifacts.write_json(artifacts.qnn_gen_greedy(tmp), {
            "new_tokens": gen.verify_new_tokens, "prompts": [p.tolist() for _, p in prompts],
            "domains": [d for d, _ in prompts], "fp32": expected, "host": got})
        del reference, answers
        result = meter.result()
        # what a device moves between host and NPU per call, as built and as it would be with float32 edges
        io = {f"io_mb_per_{what}{suffix}": round(sum(qnn.io_bytes(artifacts.qnn_gen_ctx(tmp, ar, i, verify=True),
                                                                   types) for i in range(gen.parts)) / 1e6, 3)
              for what, ar in (("decode_step", 1), ("prefill_call", n))
              for suffix, types in (("", None), ("_float32", {"": 4}))}
        violations = fidelity.domain_violations(f"{precision} generation", result, cc.gate(precision))
        metrics = record(
            model=model, precision=precision, backend="qnn-htp", device=qnn.device_name(), emulated=qnn.emulated(),
            target=cfg.target.name, soc_model=cfg.target.soc_model, htp_arch=cfg.target.htp_arch,
            prefill_len=n, context_length=gen.context_length, num_parts=gen.parts,
            method=recipe.method, **({"activation_type": "float16", "weight_type": "float16", "kv_type": "float32"}
                                     if recipe.fp16 else
                                     {"activation_type": recipe.activation_type, "weight_type": recipe.weight_type,
                                      "weight_block_size": recipe.block_size,
                                      "weight_block_offsets": recipe.block_offsets,
                                      "kv_type": recipe.kv_type or recipe.activation_type}),
            float_residual=recipe.float_residual, quantized_io=quantized_io,
            float_outliers=recipe.float_outliers, float_outlier_tensors=",".join(outliers),
            **sensitivity.mixed_metrics(recipe.mixed, kept, [x for nodes in part_nodes for g in kept
                                                             for x in nodes.get(g, [])]),
            shared=gen.share, verified_binaries="unshared (verify/): the emulator cannot load a shared binary",
            shipped_binaries="shared: one per part, AR-N and AR-1" if gen.share else "unshared",
            parts=parts_metrics, bin_mb=round(sum(p["bin_mb"] for p in parts_metrics.values()), 3), **io,
            cpu_compute_nodes=sum(p["cpu_compute_nodes"] for p in parts_metrics.values()),
            calib_prompts=0 if recipe.fp16 else len(calib), samples=len(held_out),
            window_len=int(held_out[0][1].size), **result, gen_prompts=len(prompts), gen_tokens=gen.verify_new_tokens,
            build_seconds=round(build_seconds, 2), verify_seconds=round(time.perf_counter() - start, 2),
            verify_workers=workers, worker_peak_rss_mb=round(cores.worker_peak_rss_mb(), 1),
            gate_passed=not violations)
        COMPILE_GEN.write(metrics, precision)
        if violations and cc.gate_mode(precision) == "fail":
            raise AntinetError("fidelity gate: " + "; ".join(violations) + " (bounds in compile.gates)")
    if violations:
        log.warning("fidelity gate: %s", "; ".join(violations))
    log.info("%s: %d parts, %.1f MB of binaries; top-1 %.4f, cosine %.5f, perplexity %+.2f%%%s vs the FP32 parts, "
             "greedy agreement %.3f%s", out, gen.parts, metrics["bin_mb"], result["top1_agreement"], result["cosine"],
             100 * result["ppl_increase"], fidelity.interval_text(result), result.get("gen_agreement", float("nan")),
             " (emulated)" if qnn.emulated() else "")
    return metrics


def _shared_key(name: str) -> str:
    """The tensor a graph input or output stands for across graphs: past_key_3_in and past_key_3_out are one cache."""
    return name[:-len("_in")] if name.startswith("past_") and name.endswith("_in") else \
        name[:-len("_out")] if name.startswith("past_") and name.endswith("_out") else name


SHARED_INPUTS = ("attention_mask", "position_ids_cos", "position_ids_sin")


def _shared(key: str) -> bool:
    return key.startswith(("past_", "hidden_states_")) or key in SHARED_INPUTS


def _shared_ranges(traces: dict, mask_value: float, rope_scaling: float) -> dict[str, tuple[float, float]]:
    """(min, max) of every tensor several graphs share: the mask and rotary tables by construction, each cache and
    part-boundary tensor over the calibration traces (a cache input holds the earlier outputs, so its range is the
    output's too), under the input and the output name alike."""
    found: dict[str, tuple[float, float]] = {"attention_mask": (mask_value, 0.0),
                                             "position_ids_cos": (-rope_scaling, rope_scaling),
                                             "position_ids_sin": (-rope_scaling, rope_scaling)}
    for trace_list in traces.values():
        for trace in trace_list:
            for name, x in trace.feeds.items():
                if (name.startswith("past_") or name.startswith("hidden_states_")) and x.size:
                    low, high = found.get(_shared_key(name), (np.inf, -np.inf))
                    found[_shared_key(name)] = (min(low, float(x.min())), max(high, float(x.max())))
    out = {}
    for key, span in found.items():
        names = [f"{key}_in", f"{key}_out"] if key.startswith("past_") else [key]
        out.update({name: span for name in names})
    return out


def _check_shared_encodings(encodings: dict[tuple[int, int], dict], io: dict[tuple[int, int], list[str]]) -> None:
    """Every graph that reads or writes one cache or boundary tensor must see it with one encoding (or all float)."""
    seen: dict[str, tuple] = {}
    for (ar, i), names in sorted(io.items()):
        for name in names:
            key = _shared_key(name)
            if not _shared(key):
                continue
            e = encodings[ar, i].get(name)
            value = (e["scale"], e["zero_point"], e["dtype"]) if e else ("float32",)
            if seen.setdefault(key, value) != value:
                raise AntinetError(f"the QDQ quantizer gave {key} two encodings ({seen[key]} and {value}, AR-{ar} "
                                   f"part {i}): set compile.generation.quantized_io=false to build float I/O")


@dataclass
class _NpuParts:
    """One verification job on the HTP parts: ("score", window) -> logits, ("generate", prompt) -> greedy tokens.
    Pickles into the worker processes (cores.spread); the sessions open there, once."""

    graphs: qnn.HtpGraphs
    new_tokens: int
    sources: dict[int, list[Path]]

    def __call__(self, job: tuple[str, np.ndarray]):
        kind, ids = job
        stepper = open_parts(self.sources, self.graphs.sessions)
        return stepper.score(ids) if kind == "score" else list(generation.generate(stepper, ids, self.new_tokens))

