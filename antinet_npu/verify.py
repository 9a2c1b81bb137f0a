"""`antinet-npu verify` (the seed's verify_compliance): read the metrics, print a table, judge.

Not compliant (exit 1): a benchmark that did not run on an emulator is over its latency budget, or a variant failed
its fidelity gate (evaluate or compile). Emulated timings are shown but never judged against the budget.
"""

from __future__ import annotations

from pathlib import Path

from antinet_npu import AntinetError
from antinet_npu.artifacts import METRICS, read_metrics


def verify(root: Path = METRICS) -> tuple[list[str], list[str]]:
    """(table lines, problems)."""
    bench, evaluate, compiled = (read_metrics(root / k) for k in ("bench", "evaluate", "compile"))
    if not (bench or evaluate or compiled):
        raise AntinetError(f"no metrics under {root}/: run `dvc repro` first")
    lines = [f"{'run':<30} {'ran on':<32} {'avg ms':>9} {'budget':>8}  verdict"]
    problems = []
    for name, m in bench.items():
        ran = f"{m['backend']} ({m['device']})" + (" <- fallback" if m.get("fallback_reason") else "")
        if m["emulated"]:
            verdict = "emulated: timing not judged"
        elif m["within_budget"]:
            verdict = "ok"
        else:
            verdict = "OVER BUDGET"
            problems.append(f"{name}: {m['avg_latency_ms']:.1f} ms > {m['budget_ms']:.0f} ms on {m['device']}")
        lines.append(f"{name:<30} {ran:<32} {m['avg_latency_ms']:>9.2f} {m['budget_ms']:>8.0f}  {verdict}")
    lines.append("")
    lines.append(f"{'variant':<30} {'measured on':<32} {'top-1':>9} {'cosine':>8}  verdict")
    for kind, group in (("evaluate", evaluate), ("compile", compiled)):
        for name, m in group.items():
            ok = m.get("gate_passed", True)
            if not ok:
                problems.append(f"{kind} {name}: fidelity gate failed")
            where = f"{m['backend']} ({m['device']})"
            lines.append(f"{kind + ' ' + name:<30} {where:<32} {m['top1_agreement']:>9.4f} {m['cosine']:>8.5f}  "
                         f"{'ok' if ok else 'GATE FAILED'}")
    return lines, problems


def main(root: Path = METRICS) -> int:
    lines, problems = verify(root)
    print("\n".join(lines))
    print()
    if problems:
        print("NOT COMPLIANT:\n  " + "\n  ".join(problems))
        return 1
    print("compliant: every non-emulated run within budget, every variant within its fidelity gate")
    return 0
