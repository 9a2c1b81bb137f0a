"""How close a variant's logits are to the FP32 reference, and the gates that turn that into pass or fail.

The same metric names serve CPU variants (`evaluate`) and NPU context binaries (`compile`), so the report can put
them side by side: top1_agreement, cosine, kl, max_abs_error, perplexity, perplexity_fp32, ppl_increase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from antinet_npu import AntinetError
from antinet_npu.config import GateConfig


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class FidelityMeter:
    """Accumulates comparisons window by window; `result()` gives the summary metrics."""

    positions: int = 0
    top1_matches: int = 0
    cosine_sum: float = 0.0
    kl_sum: float = 0.0
    max_abs_error: float = 0.0
    nll_sum: float = 0.0
    nll_ref_sum: float = 0.0
    predicted: int = 0
    nonfinite: int = field(default=0)
    # per window (row): NLL sums of the variant and the reference, positions predicted, top-1 matches, positions
    windows: list[tuple[float, float, int, int, int]] = field(default_factory=list)

    def add(self, reference: np.ndarray, variant: np.ndarray, input_ids: np.ndarray | None = None) -> None:
        """reference, variant: logits (..., S, V) for the same inputs; input_ids (..., S) for perplexity."""
        ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
        var = variant.reshape(-1, variant.shape[-1]).astype(np.float64)
        if not np.isfinite(var).all():
            self.nonfinite += int((~np.isfinite(var)).any(axis=-1).sum())
            var = np.nan_to_num(var, nan=0.0, posinf=1e4, neginf=-1e4)
        self.positions += ref.shape[0]
        matches = ref.argmax(-1) == var.argmax(-1)
        self.top1_matches += int(matches.sum())
        denom = np.linalg.norm(ref, axis=-1) * np.linalg.norm(var, axis=-1)
        self.cosine_sum += float(((ref * var).sum(-1) / np.maximum(denom, 1e-30)).sum())
        self.max_abs_error = max(self.max_abs_error, float(np.abs(ref - var).max()))
        lp_ref, lp_var = _log_softmax(ref), _log_softmax(var)
        self.kl_sum += float((np.exp(lp_ref) * (lp_ref - lp_var)).sum())
        if input_ids is not None:
            seq = reference.shape[-2]
            ids = input_ids.reshape(-1, seq)
            lp_ref = lp_ref.reshape(ids.shape[0], seq, -1)[:, :-1]
            lp_var = lp_var.reshape(ids.shape[0], seq, -1)[:, :-1]
            nxt = ids[:, 1:, None]
            nll_ref = -np.take_along_axis(lp_ref, nxt, -1)[..., 0].sum(-1)
            nll_var = -np.take_along_axis(lp_var, nxt, -1)[..., 0].sum(-1)
            self.nll_ref_sum += float(nll_ref.sum())
            self.nll_sum += float(nll_var.sum())
            self.predicted += nxt.size
            rows = matches.reshape(ids.shape[0], seq).sum(-1)
            self.windows += [(float(v), float(r), seq - 1, int(m), seq) for v, r, m in zip(nll_var, nll_ref, rows)]

    @classmethod
    def merged(cls, meters) -> FidelityMeter:
        """One meter over everything the given meters saw."""
        out = cls()
        for m in meters:
            out.positions += m.positions
            out.top1_matches += m.top1_matches
            out.cosine_sum += m.cosine_sum
            out.kl_sum += m.kl_sum
            out.max_abs_error = max(out.max_abs_error, m.max_abs_error)
            out.nll_sum += m.nll_sum
            out.nll_ref_sum += m.nll_ref_sum
            out.predicted += m.predicted
            out.nonfinite += m.nonfinite
            out.windows += m.windows
        return out

    def result(self) -> dict[str, float | int]:
        n = max(self.positions, 1)
        out: dict[str, float | int] = {
            "top1_agreement": self.top1_matches / n,
            "cosine": self.cosine_sum / n,
            "kl": self.kl_sum / n,
            "max_abs_error": self.max_abs_error,
            "positions": self.positions,
            "nonfinite_positions": self.nonfinite,
        }
        if self.predicted:
            ppl, ppl_ref = math.exp(self.nll_sum / self.predicted), math.exp(self.nll_ref_sum / self.predicted)
            out.update(perplexity=ppl, perplexity_fp32=ppl_ref, ppl_increase=ppl / ppl_ref - 1.0)
            out.update(self.intervals())
        return out

    def intervals(self, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
        """95 % bootstrap intervals over windows for the perplexity change and top-1 agreement: how far the
        sampling of held-out windows alone could move them (one window gives no interval)."""
        if len(self.windows) < 2:
            return {}
        w = np.asarray(self.windows, dtype=np.float64)
        picks = np.random.default_rng(seed).integers(0, len(w), size=(resamples, len(w)))
        sums = w[picks].sum(axis=1)  # (resamples, 5)
        ppl_increase = np.exp((sums[:, 0] - sums[:, 1]) / sums[:, 2]) - 1.0
        top1 = sums[:, 3] / sums[:, 4]
        lo, hi = np.percentile(ppl_increase, [2.5, 97.5])
        t_lo, t_hi = np.percentile(top1, [2.5, 97.5])
        return {"ppl_increase_ci_low": float(lo), "ppl_increase_ci_high": float(hi),
                "top1_ci_low": float(t_lo), "top1_ci_high": float(t_hi)}


class DomainMeter:
    """A `FidelityMeter` per text domain. `result()`: the figures over every domain's windows (the headline), and
    under "domains" each domain's own, with its interval."""

    def __init__(self) -> None:
        self.meters: dict[str, FidelityMeter] = {}
        self.greedy: dict[str, tuple[list[list[int]], list[list[int]]]] = {}

    def add(self, domain: str, reference: np.ndarray, variant: np.ndarray, input_ids: np.ndarray | None = None) -> None:
        self.meters.setdefault(domain, FidelityMeter()).add(reference, variant, input_ids)

    def add_greedy(self, domain: str, reference: list[list[int]], variant: list[list[int]]) -> None:
        """Greedy continuations of one domain's prompts: FP32's and the variant's."""
        self.greedy[domain] = (reference, variant)

    def result(self) -> dict:
        domains = {d: {**m.result(), **generation_agreement(*self.greedy.get(d, ([], [])))}
                   for d, m in self.meters.items()}
        everything = generation_agreement([t for ref, _ in self.greedy.values() for t in ref],
                                          [t for _, var in self.greedy.values() for t in var])
        return {**FidelityMeter.merged(self.meters.values()).result(), **everything, "domains": domains}


def domain_violations(label: str, result: dict, gate: GateConfig) -> list[str]:
    """`gate_violations` judged on each domain's held-out windows (`DomainMeter.result()`)."""
    return [v for domain, figures in result["domains"].items()
            for v in gate_violations(f"{label} on {domain}", figures, gate)]


def export_error(pairs) -> dict[str, float]:
    """How far exported logits are from PyTorch's over (got, expected, valid-position mask) triples: the largest
    absolute difference, that difference relative to the largest |expected logit| (the check is relative so that it
    means the same for any model and any CPU's float rounding), and the share of positions with the same argmax."""
    diff = scale = 0.0
    same = total = 0
    for got, ref, mask in pairs:
        keep = np.ones(ref.shape[:-1], bool) if mask is None else mask.astype(bool)
        diff = max(diff, float(np.abs(got - ref)[keep].max()))
        scale = max(scale, float(np.abs(ref)[keep].max()))
        same += int((got.argmax(-1) == ref.argmax(-1))[keep].sum())
        total += int(keep.sum())
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-30), "top1_equal": same / max(total, 1)}


def check_export(error: dict[str, float], max_rel_diff: float, min_top1: float, what: str, hint: str) -> None:
    if not (error["max_rel_diff"] <= max_rel_diff and error["top1_equal"] >= min_top1):
        raise AntinetError(f"{what} differs from PyTorch: max |logits difference| {error['max_abs_diff']:.3g} = "
                           f"{error['max_rel_diff']:.3g} of the logits' scale (export.max_rel_diff {max_rel_diff:g}), "
                           f"same argmax on {error['top1_equal']:.4f} of positions (export.min_top1 {min_top1:g}): "
                           f"{hint}")


def generation_agreement(reference: list[list[int]], variant: list[list[int]]) -> dict[str, float]:
    """Greedy continuations of the same prompts: the share of positions where the variant's token equals FP32's
    (with its spread: the worst prompt's share, the prompts equal throughout, a 95 % interval over prompts), and the
    mean position of the first difference (the continuation length when there is none)."""
    if not reference:
        return {}
    rows, firsts = [], []
    for ref, got in zip(reference, variant):
        same = [a == b for a, b in zip(ref, got)] + [False] * abs(len(ref) - len(got))
        rows.append((sum(same), len(same)))
        firsts.append(same.index(False) if False in same else len(same))
    counts = np.asarray(rows, dtype=np.float64)
    out = {"gen_agreement": counts[:, 0].sum() / max(counts[:, 1].sum(), 1),
           "gen_first_divergence": float(np.mean(firsts)),
           "gen_prompt_agreement_min": float(min(e / max(n, 1) for e, n in counts)),
           "gen_prompts_equal": int(sum(e == n for e, n in counts))}
    if len(rows) >= 2:  # 95 % bootstrap interval over prompts: how much the choice of prompts alone moves it
        picks = np.random.default_rng(0).integers(0, len(rows), size=(2000, len(rows)))
        sums = counts[picks].sum(axis=1)
        lo, hi = np.percentile(sums[:, 0] / np.maximum(sums[:, 1], 1), [2.5, 97.5])
        out.update(gen_agreement_ci_low=float(lo), gen_agreement_ci_high=float(hi))
    return out


def interval_text(metrics: dict) -> str:
    """', 95 % CI -0.10..+0.90 %' for a log line, when the bootstrap interval is known."""
    if "ppl_increase_ci_low" not in metrics:
        return ""
    return f", 95 % CI {100 * metrics['ppl_increase_ci_low']:+.2f}..{100 * metrics['ppl_increase_ci_high']:+.2f} %"


def gate_violations(precision: str, metrics: dict, gate: GateConfig) -> list[str]:
    """One message per bound a variant misses, naming the variant, the metric, its value and the bound."""
    checks = [("top1_agreement", gate.min_top1, ">="), ("cosine", gate.min_cosine, ">="),
              ("kl", gate.max_kl, "<="), ("ppl_increase", gate.max_ppl_increase, "<=")]
    out = []
    for metric, bound, op in checks:
        if bound is None or metric not in metrics:
            continue
        value = metrics[metric]
        ok = value >= bound if op == ">=" else value <= bound
        if not ok or not math.isfinite(value):
            out.append(f"{precision}: {metric} {value:.4g} is not {op} {bound:g}")
    if metrics.get("nonfinite_positions"):
        out.append(f"{precision}: {metrics['nonfinite_positions']} positions have non-finite logits")
    return out
