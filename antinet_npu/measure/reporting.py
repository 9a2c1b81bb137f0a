"""What a person reads: the summary table, the NPU/CPU/GPU comparison, the seed-format JSON and the plot data.

Built only from metrics files: this machine's (`metrics/`) and any dropped in from devices
(`metrics/devices/<device>/{bench,evaluate,compile}/*.json`, written by `bench` on e.g. a Windows-on-Snapdragon
laptop). Emulated timings are always marked and never ranked against real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from antinet_npu import metrics as M
from antinet_npu.metrics import ROOT as METRICS
from antinet_npu.runtime.backends.registry import SPECS

LOCAL = "this machine"


def unit_of(backend: str) -> str:
    """CPU / NPU / GPU, as the backend's spec says (a device's metrics may name a backend unknown here)."""
    return SPECS[backend].unit if backend in SPECS else backend


def artifact_of(backend: str, generation: bool = False) -> str | None:
    """The artifact kind a backend ran (`BackendSpec`), which says whose metrics hold its fidelity."""
    spec = SPECS.get(backend)
    return None if spec is None else spec.generation if generation else spec.single_pass


@dataclass
class Source:
    """The metrics of one machine: this one, or a device whose results were dropped into metrics/devices/."""

    name: str
    bench: dict[str, dict] = field(default_factory=dict)
    evaluate: dict[str, dict] = field(default_factory=dict)
    compile: dict[str, dict] = field(default_factory=dict)
    prepare: dict = field(default_factory=dict)


def load_sources(root: Path = METRICS, model: str | None = None) -> list[Source]:
    """This machine's metrics (only `model`'s when given) and every device's.

    Switching models in one workspace (`dvc exp run -S model=...`) leaves the other model's files behind when its
    stages are not in the new DAG (e.g. compile); they are not this run's results, so they are left out.
    """
    def local(kind: str) -> dict[str, dict]:
        return M.KINDS[kind].read(root, model)

    prepare = M.PREPARE.read(root).get("prepare", {})
    sources = [Source(LOCAL, local("bench"), local("evaluate"), local("compile"), prepare)]
    for device in M.devices(root):
        sources.append(Source(device.name, M.BENCH.read(device), M.EVALUATE.read(device),
                              M.COMPILE.read(device)))
    return sources


def fidelity_of(source: Source, local: Source, m: dict) -> tuple[dict | None, float | None]:
    """(fidelity metrics, model size in MB) of the variant a bench run actually ran."""
    precision, backend = m["precision_run"], m["backend"]
    for src in (source, local):
        what = artifact_of(backend)
        if what == "qnn-context":
            found = src.compile.get(M.COMPILE.key(precision=precision, seq_len=m["seq_len"]))
            if found:
                return found, found.get("bin_size_mb")
        elif what == "pytorch":
            found = src.evaluate.get("fp32")
            return found, src.prepare.get("size_mb") or (found or {}).get("size_mb")
        else:
            found = src.evaluate.get(precision)
            if found:
                return found, found.get("size_mb")
    return None, None


def rows(sources: list[Source]) -> list[dict]:
    """One row per benchmark run (all sources), with its variant's fidelity."""
    out = []
    for src in sources:
        for m in src.bench.values():
            fid, size = fidelity_of(src, sources[0], m)
            out.append({
                "source": src.name, "model": m["model"], "run": m["run"], "backend": m["backend"],
                "requested_backend": m["requested_backend"], "precision": m["precision_run"],
                "seq_len": m["seq_len"], "device": m["device"], "emulated": m["emulated"],
                "fallback": m.get("fallback_reason"), "avg_ms": m["avg_latency_ms"], "min_ms": m["min_latency_ms"],
                "max_ms": m["max_latency_ms"], "p90_ms": m["p90_latency_ms"],
                "qps": m["throughput_qps"], "tokens_per_s": m["tokens_per_s"], "within_budget": m["within_budget"],
                "budget_ms": m["budget_ms"], "size_mb": size,
                "top1": fid.get("top1_agreement") if fid else None, "cosine": fid.get("cosine") if fid else None,
                "ppl_increase": fid.get("ppl_increase") if fid else None, "threads": m.get("threads"),
                "host": m.get("host", {}), "versions": m.get("versions", {}),
            })
    _add_speedups(out)
    return sorted(out, key=lambda r: (r["model"], r["source"] != LOCAL, r["source"], r["backend"], r["precision"],
                                      r["seq_len"]))


BASELINES = {"speedup_vs_torch": ("torch", "fp32"), "speedup_vs_ort_fp32": ("ort-cpu", "fp32")}


def _add_speedups(table: list[dict]) -> None:
    """Baseline latency / this latency, against the baseline measured by the same source for the same model and S.

    Emulated timings get no ratio (neither side may be emulated), nor does a run that fell back to another backend.
    """
    real = {(r["source"], r["model"], r["seq_len"], r["backend"], r["precision"]): r["avg_ms"]
            for r in table if not r["emulated"] and not r["fallback"]}
    for r in table:
        for key, (backend, precision) in BASELINES.items():
            base = real.get((r["source"], r["model"], r["seq_len"], backend, precision))
            usable = base is not None and not r["emulated"] and not r["fallback"] and r["avg_ms"] > 0
            r[key] = round(base / r["avg_ms"], 3) if usable else None


def speedups(sources: list[Source]) -> dict[str, dict]:
    """This machine's speedup ratios per bench run: the `dvc metrics` file of the report stage."""
    return {r["run"]: {k: r[k] for k in BASELINES} for r in rows(sources[:1])
            if any(r[k] is not None for k in BASELINES)}


STAGE_METRICS = (M.PREPARE, M.EXPORT, M.SENSITIVITY, M.QUANTIZE, M.EVALUATE, M.EXPORT_NPU, M.COMPILE,
                 M.EXPORT_NPU_GEN, M.COMPILE_GEN, M.GENIE, M.BENCH, M.EXPORT_GENAI, M.EXPORT_GGUF, M.BENCH_GEN)


def resource_lines(model: str, root: Path = METRICS) -> list[str]:
    """Wall time and peak resident memory of every stage run for `model` on this machine (its metrics files): the
    stage's process from its start to its metrics file, imports and loading included (DVC's own work is not)."""
    lines = ["### Stages: time and peak memory", "", "| stage | seconds | peak RSS MB |", "|---|---|---|"]
    for kind in STAGE_METRICS:
        for key, m in kind.read(root, model).items():
            if "peak_rss_mb" not in m:
                continue
            name = key if kind.template is None else f"{kind.stage}/{key}"
            lines.append(f"| {name} | {_fmt(m.get('wall_seconds'), '.1f')} | {m['peak_rss_mb']:.0f} |")
    return lines + [""] if len(lines) > 4 else []


def fidelity_lines(source: Source, model: str) -> list[str]:
    """Every variant's fidelity against FP32 and its gate, CPU (evaluate) and NPU (compile); misses flagged."""
    entries = [("CPU (onnxruntime)", p, m, m.get("size_mb")) for p, m in sorted(source.evaluate.items())
               if m.get("model") == model and p != "fp32"]
    entries += [("NPU (QNN HTP" + (", emulated)" if m.get("emulated") else ")"), p, m, m.get("bin_size_mb"))
                for p, m in sorted(source.compile.items()) if m.get("model") == model]
    if not entries:
        return []
    lines = ["### Fidelity vs FP32 and gates", "",
             "| unit | variant | size MB | top-1 | cosine | ppl Δ | gate |", "|---|---|---|---|---|---|---|"]
    for unit, name, m, size in entries:
        gate = "passed" if m.get("gate_passed", True) else "**MISSED**"
        lines.append(f"| {unit} | {name} | {_fmt(size, '.1f')} | {_fmt(m.get('top1_agreement'), '.4f')} | "
                     f"{_fmt(m.get('cosine'), '.5f')} | {_pct(m.get('ppl_increase'))} | {gate} |")
    return lines + [""] + domain_lines(entries, model)


def domain_lines(entries: list[tuple[str, str, dict, float | None]], model: str, root: Path = METRICS) -> list[str]:
    """Each variant's fidelity on each text domain's held-out windows (95 % intervals over windows), the NPU
    generation parts included; the gates are judged per domain."""
    entries = [*entries, *(("NPU generation parts" + (", emulated" if m.get("emulated") else ""), p, m, None)
                           for p, m in sorted(M.COMPILE_GEN.read(root).items()) if m.get("model") == model)]
    entries = [e for e in entries if e[2].get("domains")]
    if not entries:
        return []
    lines = ["### Fidelity by text domain", "",
             "| unit | variant | domain | positions | top-1 [95 % CI] | ppl Δ [95 % CI] | greedy = FP32 [95 % CI] "
             "| prompts equal |",
             "|---|---|---|---|---|---|---|---|"]
    for unit, name, m, _ in entries:
        for domain, f in m["domains"].items():
            top1 = f"{f['top1_agreement']:.4f}" + (f" [{f['top1_ci_low']:.3f}, {f['top1_ci_high']:.3f}]"
                                                   if "top1_ci_low" in f else "")
            ppl = _pct(f.get("ppl_increase")) + (f" [{_pct(f['ppl_increase_ci_low'])}, "
                                                 f"{_pct(f['ppl_increase_ci_high'])}]"
                                                 if "ppl_increase_ci_low" in f else "")
            greedy = _fmt(f.get("gen_agreement"), ".3f") + (f" [{f['gen_agreement_ci_low']:.3f}, "
                                                            f"{f['gen_agreement_ci_high']:.3f}]"
                                                            if "gen_agreement_ci_low" in f else "")
            lines.append(f"| {unit} | {name} | {domain} | {f.get('positions')} | {top1} | {ppl} | {greedy} | "
                         f"{f.get('gen_prompts_equal', '—')} |")
    return lines + ["", "Positions: teacher-forced positions compared. A domain's held-out documents are never "
                    "calibration text; calibration draws from every domain; each gate is judged on every domain. "
                    "Greedy: the share of generated tokens equal to FP32's (interval: bootstrap over "
                    "prompts); prompts equal: prompts whose whole continuation is FP32's.", ""]


def sensitivity_lines(model: str, root: Path = METRICS, top: int = 10) -> list[str]:
    """Per probe, the layer groups whose quantization alone does the most damage, and what each mixed recipe kept."""
    probes = {p: m for p, m in M.SENSITIVITY.read(root).items() if m.get("model") == model}
    if not probes:
        return []
    lines = ["### Layer-group sensitivity (one group quantized at a time, calibration text)", ""]
    for probe, m in probes.items():
        ranked = sorted(m["groups"].items(), key=lambda kv: kv[1]["rank"])
        total = sum(g["kl"] for _, g in ranked)
        lines += [f"Probe `{probe}`: {len(ranked)} groups, KL summed over groups {total:.2e}; the top {top}:", "",
                  "| rank | group | KL vs float | share of summed KL | top-1 |", "|---|---|---|---|---|"]
        lines += [f"| {g['rank']} | {name} | {g['kl']:.2e} | {100 * g['kl'] / total if total else 0:.1f} % | "
                  f"{g['top1_agreement']:.4f} |" for name, g in ranked[:top]]
        lines.append("")
    kept = [(f"CPU {p}", m) for p, m in sorted(M.QUANTIZE.read(root).items())]
    kept += [(f"NPU {p}", m) for p, m in sorted(M.COMPILE.read(root).items())]
    kept = [(name, m) for name, m in kept if m.get("model") == model and m.get("mixed_probe")]
    if kept:
        lines += ["| mixed variant | probe | kept as | groups kept |", "|---|---|---|---|"]
        lines += [f"| {name} | {m['mixed_probe']} | {m['mixed_keep_as']} | {m['kept_groups'].replace(',', ', ')} |"
                  for name, m in kept]
        lines.append("")
    return lines


def sensitivity_rows(model: str, root: Path = METRICS) -> list[dict]:
    """Plot data: every probe's damage per layer group."""
    return [{"probe": probe, "group": name, "rank": g["rank"], "kl": g["kl"], "top1_agreement": g["top1_agreement"]}
            for probe, m in M.SENSITIVITY.read(root).items() if m.get("model") == model
            for name, g in sorted(m["groups"].items())]


def _generation_runs(model: str, root: Path) -> list[tuple[str, dict, int, dict]]:
    """(run, metrics, prompt length, figures at that length) of every bench-gen run of `model`, by run then P; a
    device's runs (metrics/devices/<device>/bench-gen/) as "<run> @ <device>"."""
    out = []
    for folder, suffix in [(root, ""), *((d, f" @ {d.name}") for d in M.devices(root))]:
        for run, m in M.BENCH_GEN.read(folder).items():
            if m.get("model") != model:
                continue
            for key, figures in m.items():
                if key.startswith("p") and key[1:].isdigit() and isinstance(figures, dict):
                    out.append((run + suffix, m, int(key[1:]), figures))
    return sorted(out, key=lambda r: (r[0], r[2]))


def generation_lines(model: str, root: Path = METRICS) -> list[str]:
    """Prefill + decode per run and prompt length, with the variant's greedy agreement with FP32; then how our
    best KV-cache decode compares with the peer's and with re-running the prefix, in this run."""
    runs = _generation_runs(model, root)
    if not runs:
        return []
    built = {"onnx": M.EVALUATE.read(root), "genai": M.EXPORT_GENAI.read(root), "gguf": M.EXPORT_GGUF.read(root),
             "qnn-parts": M.COMPILE_GEN.read(root), "genie": M.GENIE.read(root)}
    lines = ["### Generation: prefill + decode (greedy, batch 1)", "",
             "| run | backend | precision | KV cache | P | G | TTFT ms | decode tokens/s | p50 ms/token | "
             "p90 ms/token | e2e ms | greedy = FP32 | peak RSS MB |", "|---" * 13 + "|"]
    for run, m, p, f in runs:
        what = artifact_of(m["backend"], generation=True)
        fid = built.get(what, {}).get(m["precision"])
        agree = fid.get("genie_fp32_agreement" if what == "genie" else "gen_agreement") \
            if fid and fid.get("model") == model else None
        backend = f"{m['backend']} (emulated)" if m.get("emulated") else m["backend"]
        lines.append(f"| {run} | {backend} | {m['precision']} | {'yes' if m.get('kv_cache') else 'no'} | {p} | "
                     f"{f['new_tokens']} | {f['ttft_ms']:.1f} | {f['decode_tokens_per_s']:.1f} | "
                     f"{f['p50_decode_ms_per_token']:.2f} | {f['p90_decode_ms_per_token']:.2f} | {f['e2e_ms']:.0f} | "
                     f"{_fmt(agree, '.3f')} | {m['peak_rss_mb']:.0f} |")
    lines += ["", "greedy = FP32: share of greedy tokens equal to our FP32 ONNX model's on held-out prompts "
              "(evaluate; export-genai and export-gguf for the peers; compile-gen for the NPU parts, against the FP32 "
              "parts). Speeds compare only within one run on one machine; an emulated run's times say nothing about "
              "the NPU.", ""]
    longest = max(p for _, _, p, _ in runs)
    tps = {run: f["decode_tokens_per_s"] for run, m, p, f in runs if p == longest and not m.get("emulated")}
    ratios = [f"{ours} vs {other}: {tps[ours] / tps[other]:.2f}x" for ours, other in (
        ("ort-cpu-int8-block", "ort-genai-int8"), ("ort-cpu-int4-block", "ort-genai-int4"),
        ("ort-cpu-fp32", "ort-genai-fp32"), ("ort-cpu-int8-block", "llama-cpp-q8_0"),
        ("ort-cpu-int4-block", "llama-cpp-q4_0"), ("ort-cpu-int4-block-rtn", "ort-genai-int4"),
        ("ort-cpu-int4-block-rtn", "llama-cpp-q4_0"), ("ort-cpu-int8-block", "ort-cpu-int8-block-nocache"))
        if ours in tps and other in tps]
    if ratios:
        lines += [f"Decode tokens/s at P={longest}: " + "; ".join(ratios) + ".", ""]
    return lines


def npu_generation_lines(model: str, root: Path = METRICS) -> list[str]:
    """The compiled NPU generation parts: binaries (shared vs unshared), nodes outside QNN, fidelity on the HTP
    backend, and which binaries were verified how."""
    found = {k: m for k, m in M.COMPILE_GEN.read(root).items() if m.get("model") == model}
    if not found:
        return []
    lines = ["### NPU generation parts (compile-gen)", "",
             "| precision | weights / activations / KV | parts | AR-N / context | .bin MB shipped | .bin MB unshared | "
             "nodes on CPU | top-1 | cosine | perplexity | greedy = FP32 | verified on |", "|---" * 12 + "|"]
    for name, m in sorted(found.items()):
        unshared = sum(p.get("unshared_bin_mb", 0) for p in m.get("parts", {}).values())
        kept = f" ({len(m['kept_groups'].split(','))} groups {m['mixed_keep_as']})" if m.get("kept_groups") else ""
        block = f" b{m['weight_block_size']}" if m.get("weight_block_size") else ""
        block += "+offsets" if m.get("weight_block_offsets") else ""
        outliers = m.get("float_outlier_tensors")
        kept += f" ({len(outliers.split(','))} massive activations float)" if outliers else ""
        types = f"{m.get('weight_type', '?')}{block}{kept} / {m.get('activation_type', '?')} / {m.get('kv_type', '?')}"
        lines.append(f"| {name} | {types} | {m['num_parts']} | {m['prefill_len']} / {m['context_length']} | "
                     f"{m['bin_mb']:.1f} "
                     f"({'shared' if m.get('shared') else 'unshared'}) | {unshared:.1f} | {m['cpu_compute_nodes']} | "
                     f"{m['top1_agreement']:.4f} | {m['cosine']:.5f} | {100 * m['ppl_increase']:+.2f} % | "
                     f"{_fmt(m.get('gen_agreement'), '.3f')} | {m['device']}{' (emulated)' if m['emulated'] else ''}"
                     f" |")
    lines += ["", "Shipped: one context binary per part holding its AR-N and AR-1 graphs over one copy of the weights. "
              "Verified: the same QDQ graphs compiled unshared (the x86_64 emulator cannot load a shared binary), "
              "teacher-forced against the FP32 parts on held-out windows and by greedy generation.", ""]
    bundles = {k: m for k, m in M.GENIE.read(root).items() if m.get("model") == model}
    if bundles:
        lines += ["### Genie bundles (genie)", "",
                  "| precision | bundle MB | Genie API | QNN of the binaries | prompts × tokens | = our host loop | "
                  "greedy = FP32 | gate | checked on |", "|---" * 9 + "|"]
        for name, m in sorted(bundles.items()):
            lines.append(f"| {name} | {m['bundle_mb']:.1f} | {m['genie_api_version']} | {m['qnn_sdk_version']} | "
                         f"{m['gen_prompts']} × {m['gen_tokens']} | {_fmt(m['genie_host_agreement'], '.3f')} | "
                         f"{_fmt(m['genie_fp32_agreement'], '.3f')} | {'passed' if m['gate_passed'] else 'MISSED'} | "
                         f"{m['device']}{' (emulated, unshared binaries)' if m['emulated'] else ''} |")
        lines += ["", "Genie, Qualcomm's LLM runtime, generating from the bundle's dialog config; '= our host loop': "
                  "the share of its greedy tokens equal to our host loop's over the same binaries.", ""]
    return lines


def generation_rows(model: str, root: Path = METRICS) -> list[dict]:
    """Plot data: decode tokens/s and TTFT per run and prompt length."""
    return [{"series": f"{run} P={p}", "run": run, "prompt_len": p, "decode_tokens_per_s": f["decode_tokens_per_s"],
             "ttft_ms": f["ttft_ms"]} for run, _, p, f in _generation_runs(model, root)]


def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _pct(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:+.2f} %"


def summary_markdown(sources: list[Source], compare_at: int = 128) -> str:
    table = rows(sources)
    lines = ["# antinet-npu summary", "",
             "Every number below was measured by the pipeline and read from `metrics/`. Timings marked *emulated* "
             "come from Qualcomm's x86_64 HTP emulator: the graph and its numerics are real, the time is not NPU "
             "latency.", ""]
    for model in sorted({r["model"] for r in table}):
        lines += [f"## {model}", "",
                  "| source | backend | precision | S | avg ms | p90 ms | QPS | tokens/s | × torch | × ORT fp32 "
                  "| size MB | top-1 | cosine | ppl Δ | within budget | emulated | fallback |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in table if r["model"] == model):
            fallback = f"from {r['requested_backend']}" if r["fallback"] else ""
            lines.append(
                f"| {r['source']} | {r['backend']} | {r['precision']} | {r['seq_len']} | {r['avg_ms']:.2f} | "
                f"{r['p90_ms']:.2f} | {r['qps']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{_fmt(r['speedup_vs_torch'], '.2f')} | {_fmt(r['speedup_vs_ort_fp32'], '.2f')} | "
                f"{_fmt(r['size_mb'], '.1f')} | "
                f"{_fmt(r['top1'], '.4f')} | {_fmt(r['cosine'], '.5f')} | "
                f"{_pct(r['ppl_increase'])} | "
                f"{'yes' if r['within_budget'] else 'NO'}{' (not judged)' if r['emulated'] else ''} | "
                f"{'**emulated**' if r['emulated'] else 'no'} | {fallback} |")
        lines += ["", "× torch, × ORT fp32: speedup over PyTorch eager FP32 and onnxruntime FP32 measured in the same "
                  "run at the same S (none for emulated timings).", "",
                  *generation_lines(model), *npu_generation_lines(model),
                  *fidelity_lines(sources[0], model), *sensitivity_lines(model),
                  *comparison(table, model, compare_at), "",
                  *resource_lines(model)]
    lines += environment(sources)
    return "\n".join(lines) + "\n"


def comparison(table: list[dict], model: str, seq_len: int) -> list[str]:
    """The seed's "NPU vs CPU vs GPU at 128 tokens", from measurements only; emulated rows never ranked."""
    at = [r for r in table if r["model"] == model and r["seq_len"] == seq_len]
    lines = [f"### NPU vs CPU vs GPU at {seq_len} tokens", "",
             "| unit | fastest measured run | where | avg ms | QPS | rank |", "|---|---|---|---|---|---|"]
    real = sorted((r for r in at if not r["emulated"]), key=lambda r: r["avg_ms"])
    best: dict[str, dict] = {}
    for r in real:
        best.setdefault(unit_of(r["backend"]), r)
    ranked = sorted(best.items(), key=lambda kv: kv[1]["avg_ms"])
    rank = {unit: i + 1 for i, (unit, _) in enumerate(ranked)}
    for unit in ("NPU", "CPU", "GPU"):
        if unit in best:
            r = best[unit]
            lines.append(f"| {unit} | {r['backend']} {r['precision']} | {r['source']} ({r['device']}) | "
                         f"{r['avg_ms']:.2f} | {r['qps']:.2f} | {rank[unit]} of {len(ranked)} |")
        else:
            lines.append(f"| {unit} | not measured on a real {unit} | | | | |")
        for r in (r for r in at if r["emulated"] and unit_of(r["backend"]) == unit):
            lines.append(f"| {unit} (emulated) | {r['backend']} {r['precision']} | {r['source']} ({r['device']}) | "
                         f"{r['avg_ms']:.2f} *emulated* | – | not ranked: emulator time is not NPU latency |")
    return lines


def environment(sources: list[Source]) -> list[str]:
    lines = ["## Environment", ""]
    for src in sources:
        sample = next(iter(src.bench.values()), None) or next(iter(src.evaluate.values()), None)
        if not sample:
            continue
        h, v = sample.get("host", {}), sample.get("versions", {})
        threads = sorted({str(m.get("threads")) for m in src.bench.values() if m.get("threads") is not None})
        lines.append(f"- **{src.name}**: {h.get('cpu', '?')} ({h.get('cpu_count', '?')} cores, {h.get('os', '?')} "
                     f"{h.get('arch', '?')}), CPU threads setting {', '.join(threads) or 'n/a'} (0 = all cores); "
                     + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    return lines


def benchmark_json(sources: list[Source], model: str) -> dict:
    """One seed-format object (device, model, tests[]) per source/backend/precision, plus what the seed lacks."""
    groups: dict[tuple, dict] = {}
    for r in rows(sources):
        key = (r["source"], r["requested_backend"], r["backend"], r["precision"], r["device"])
        entry = groups.setdefault(key, {
            "device": r["device"], "model": r["model"], "source": r["source"], "backend": r["backend"],
            "requested_backend": r["requested_backend"], "precision": r["precision"], "emulated": r["emulated"],
            "fallback_reason": r["fallback"], "tests": []})
        entry["tests"].append({"sequence_length": r["seq_len"], "avg_latency_ms": r["avg_ms"],
                               "min_latency_ms": r["min_ms"], "max_latency_ms": r["max_ms"],
                               "throughput_qps": r["qps"]})
    return {"model": model, "benchmarks": list(groups.values())}


def plot_rows(sources: list[Source]) -> tuple[list[dict], list[dict]]:
    """(latency vs sequence length, size vs fidelity) rows for `dvc plots`."""
    latency = [{"series": f"{r['backend']} {r['precision']}" + (" (emulated)" if r["emulated"] else "")
                + ("" if r["source"] == LOCAL else f" @ {r['source']}"),
                "seq_len": r["seq_len"], "avg_latency_ms": r["avg_ms"], "emulated": r["emulated"]}
               for r in rows(sources)]
    local = sources[0]
    fidelity = [{"variant": f"cpu {p}", "size_mb": m["size_mb"], "top1_agreement": m["top1_agreement"],
                 "cosine": m["cosine"]} for p, m in local.evaluate.items()]
    fidelity += [{"variant": f"npu {p}", "size_mb": m["bin_size_mb"], "top1_agreement": m["top1_agreement"],
                  "cosine": m["cosine"]} for p, m in local.compile.items()]
    return latency, fidelity
