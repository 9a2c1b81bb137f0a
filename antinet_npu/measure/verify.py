"""`antinet-npu verify` (the seed's verify_compliance): read the metrics, print a table, judge.

Judged against what the config asks for (bench.runs, bench.generation.runs, evaluate.variants, the compile matrix),
so a result that is missing, damaged, for another model or without a verdict makes it fail, as do a benchmark that
did not run on an emulator over its latency budget and a variant under its fidelity gate. Device results dropped
into metrics/devices/<device>/ are judged the same way. Emulated timings are shown but never judged.
"""

from __future__ import annotations

import math
from pathlib import Path

from antinet_npu import AntinetError
from antinet_npu import metrics as M
from antinet_npu.config import Config
from antinet_npu.metrics import ROOT as METRICS


def expected_results(cfg: Config) -> dict[str, list[str]]:
    """Metrics folder -> the result names the config asks for."""
    return {"bench": list(cfg.bench.runs), "bench-gen": list(cfg.bench.generation.runs),
            "evaluate": list(cfg.evaluate.variants),
            "compile": [M.COMPILE.key(precision=p, seq_len=s) for p in cfg.compile.precisions
                        for s in cfg.compile.seq_lens],
            "compile-gen": list(cfg.compile.generation.precisions)}


def _read(kind: M.MetricsFile, key: str, root: Path) -> tuple[dict | None, str | None]:
    """(metrics, None) or (None, what is wrong with the file): verify lists every problem instead of stopping."""
    try:
        return kind.read_one(key, root), None
    except AntinetError as exc:
        return None, str(exc)


def _number(m: dict, key: str) -> float | None:
    value = m.get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _judge_bench(name: str, m: dict, problems: list[str]) -> str:
    avg, budget = _number(m, "avg_latency_ms"), _number(m, "budget_ms")
    if m.get("emulated") is True:
        return "emulated: timing not judged"
    if m.get("emulated") is not False or avg is None or budget is None or not isinstance(m.get("within_budget"),
                                                                                          bool):
        problems.append(f"{name}: no judgeable result (emulated, avg_latency_ms, budget_ms, within_budget missing "
                        "or not of the right type): re-run its bench stage")
        return "UNJUDGED"
    if not m["within_budget"] or avg > budget:
        problems.append(f"{name}: {avg:.1f} ms > {budget:.0f} ms on {m.get('device', '?')}")
        return "OVER BUDGET"
    return "ok"


def verify(cfg: Config, root: Path = METRICS) -> tuple[list[str], list[str]]:
    """(table lines, problems)."""
    if not root.is_dir():
        raise AntinetError(f"no metrics under {root}/: run `dvc repro` first (from the project root)")
    model = cfg.model.name
    problems: list[str] = []
    found: dict[str, dict[str, dict]] = {}
    for kind, names in expected_results(cfg).items():
        found[kind] = {}
        for name in names:
            path = M.KINDS[kind].path(name, root)
            if not path.is_file():
                problems.append(f"{kind} {name}: no result ({path} missing): run `dvc repro`")
                continue
            m, error = _read(M.KINDS[kind], name, root)
            if error:
                problems.append(f"{kind} {name}: {error}")
            elif m.get("model") != model:
                problems.append(f"{kind} {name}: the result is for model {m.get('model')!r}, params.yaml says "
                                f"{model!r}: run `dvc repro`")
            else:
                found[kind][name] = m

    lines = [f"{'run':<34} {'ran on':<32} {'avg ms':>9} {'budget':>8}  verdict"]
    bench_sets = [("", found["bench"])]
    for device in M.devices(root):
        results = {}
        for path in sorted(M.BENCH.folder(device).glob("*.json")):
            m, error = _read(M.BENCH, path.stem, device)
            if error:
                problems.append(f"device {device.name}: {error}")
            else:
                results[path.stem] = m
        bench_sets.append((f"{device.name}: ", results))
    for prefix, results in bench_sets:
        for name, m in results.items():
            verdict = _judge_bench(prefix + name, m, problems)
            ran = f"{m.get('backend')} ({m.get('device')})" + (" <- fallback" if m.get("fallback_reason") else "")
            avg, budget = _number(m, "avg_latency_ms"), _number(m, "budget_ms")
            lines.append(f"{prefix + name:<34} {ran:<32} {avg if avg is not None else float('nan'):>9.2f} "
                         f"{budget if budget is not None else float('nan'):>8.0f}  {verdict}")

    lines += ["", f"{'generation run':<34} {'ran on':<32} {'TTFT ms':>9} {'tok/s':>8}  verdict"]
    for name, m in found["bench-gen"].items():
        blocks = [m.get(f"p{p}") for p in cfg.bench.generation.prompt_lens]
        good = all(isinstance(b, dict) and (_number(b, "ttft_ms") or 0) > 0
                   and (_number(b, "decode_tokens_per_s") or 0) > 0 for b in blocks)
        if not good:
            problems.append(f"bench-gen {name}: no figures for every prompt length of bench.generation.prompt_lens: "
                            "re-run its bench-gen stage")
        first = blocks[0] if blocks and isinstance(blocks[0], dict) else {}
        lines.append(f"{name:<34} {str(m.get('backend')) + ' (' + str(m.get('device')) + ')':<32} "
                     f"{_number(first, 'ttft_ms') or float('nan'):>9.1f} "
                     f"{_number(first, 'decode_tokens_per_s') or float('nan'):>8.1f}  {'ok' if good else 'UNJUDGED'}")

    lines += ["", f"{'variant':<34} {'measured on':<32} {'top-1':>9} {'cosine':>8}  verdict"]
    for kind in ("evaluate", "compile", "compile-gen"):
        for name, m in found[kind].items():
            passed = m.get("gate_passed")
            if passed is not True:
                problems.append(f"{kind} {name}: " + ("fidelity gate failed" if passed is False else
                                                      "no gate verdict (gate_passed missing): re-run the stage"))
            top1, cosine = _number(m, "top1_agreement"), _number(m, "cosine")
            lines.append(f"{kind + ' ' + name:<34} {str(m.get('backend')) + ' (' + str(m.get('device')) + ')':<32} "
                         f"{top1 if top1 is not None else float('nan'):>9.4f} "
                         f"{cosine if cosine is not None else float('nan'):>8.5f}  "
                         f"{'ok' if passed is True else 'GATE FAILED' if passed is False else 'UNJUDGED'}")
    return lines, problems


def main(cfg: Config, root: Path = METRICS) -> int:
    lines, problems = verify(cfg, root)
    print("\n".join(lines))
    print()
    if problems:
        print("NOT COMPLIANT:\n  " + "\n  ".join(problems))
        return 1
    print("compliant: every result the config asks for is present; every non-emulated run within budget, every "
          "variant within its fidelity gate")
    return 0
