"""What the stages measured: one `MetricsFile` per kind of metrics file (where it lives, what its name is made of,
what every file of that kind records), the one place metrics files are named, written and read.

Stages write through `KIND.write(...)`, reporting and verify read through `KIND.read(...)`: a file missing one of its
kind's `records` is refused when written (a stage that forgot to say where it ran) and reported when read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antinet_npu import AntinetError

ROOT = Path("metrics")
DEVICES = "devices"  # metrics/devices/<device>/<kind>/: results made elsewhere (a Snapdragon device)
#: what every file carries besides its own figures (`provenance.record`)
PROVENANCE = ("wall_seconds", "peak_rss_mb", "host", "versions")
RAN = ("backend", "device", "emulated")  # where a measurement ran (timings and fidelity alike)
FIDELITY = ("top1_agreement", "ppl_increase", "ppl_increase_ci_low", "ppl_increase_ci_high", "gate_passed")


@dataclass(frozen=True)
class MetricsFile:
    """One kind of metrics file: `metrics/<stage>.json`, or `metrics/<stage>/<key>.json` with the key made from
    `template` (e.g. "{precision}-{seq_len}")."""

    stage: str
    template: str | None = None
    records: tuple[str, ...] = ("model",)
    provenance: bool = True

    def key(self, **fields: Any) -> str:
        if self.template is None:
            raise TypeError(f"{self.stage} metrics are one file, without a key")
        return self.template.format(**fields)

    def path(self, key: str | None = None, root: Path = ROOT) -> Path:
        if self.template is None:
            return root / f"{self.stage}.json"
        if key is None:
            raise TypeError(f"{self.stage} metrics need a key ({self.template})")
        return root / self.stage / f"{key}.json"

    def folder(self, root: Path = ROOT) -> Path:
        return root / self.stage

    def missing(self, metrics: dict) -> list[str]:
        return [k for k in (*self.records, *(PROVENANCE if self.provenance else ())) if k not in metrics]

    def write(self, metrics: dict[str, Any], key: str | None = None, root: Path = ROOT) -> Path:
        from antinet_npu import artifacts

        if missing := self.missing(metrics):
            raise TypeError(f"{self.stage} metrics must record {', '.join(missing)}")
        path = self.path(key, root)
        artifacts.write_metrics(path, metrics)
        return path

    def read_one(self, key: str | None = None, root: Path = ROOT) -> dict:
        """One file; a missing or damaged one is a one-line error naming it and the stage to re-run."""
        path = self.path(key, root)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise AntinetError(f"{path} not found: run `dvc repro {self.stage}` first") from None
        except (OSError, ValueError) as exc:
            raise AntinetError(f"{path} is damaged ({str(exc).splitlines()[0][:120]}): re-run the stage that "
                               f"writes it (`dvc repro {self.stage}`)") from None
        if not isinstance(data, dict):
            raise AntinetError(f"{path} does not hold a metrics object: re-run `dvc repro {self.stage}`")
        return data

    def read(self, root: Path = ROOT, model: str | None = None) -> dict[str, dict]:
        """Every file of this kind under `root` by key (only `model`'s when given); a damaged one is an error."""
        if self.template is None:
            return {self.stage: self.read_one(root=root)} if self.path(root=root).is_file() else {}
        found = {p.stem: self.read_one(p.stem, root) for p in sorted(self.folder(root).glob("*.json"))}
        return {k: m for k, m in found.items() if model is None or m.get("model") == model}


PREPARE = MetricsFile("prepare", records=("model", "num_parameters", "size_mb"))
EXPORT = MetricsFile("export", records=("model", "top1_equal", "greedy_prompts_equal"))
SENSITIVITY = MetricsFile("sensitivity", "{probe}", ("model", "probe", "groups", "samples"))
QUANTIZE = MetricsFile("quantize", "{precision}", ("model", "precision", "size_mb"))
EVALUATE = MetricsFile("evaluate", "{precision}", ("model", "precision", *RAN, *FIDELITY))
EXPORT_NPU = MetricsFile("export-npu", "s{seq_len}", ("model", "seq_len", "top1_equal"))
EXPORT_NPU_GEN = MetricsFile("export-npu-gen", records=("model", "num_parts", "greedy_prompts_equal"))
COMPILE = MetricsFile("compile", "{precision}-{seq_len}", ("model", "precision", "seq_len", *RAN, *FIDELITY,
                                                           "bin_size_mb"))
COMPILE_GEN = MetricsFile("compile-gen", "{precision}", ("model", "precision", *RAN, *FIDELITY, "gen_agreement"))
GENIE = MetricsFile("genie", "{precision}", ("model", "precision", *RAN, "genie_host_agreement", "gate_passed"))
EXPORT_GENAI = MetricsFile("export-genai", "{precision}", ("model", "precision", "gen_agreement"))
EXPORT_GGUF = MetricsFile("export-gguf", "{precision}", ("model", "precision", "gen_agreement"))
BENCH = MetricsFile("bench", "{run}", ("model", "run", *RAN, "requested_backend", "fallback_reason", "precision_run",
                                       "avg_latency_ms", "budget_ms", "within_budget"))
BENCH_GEN = MetricsFile("bench-gen", "{run}", ("model", "run", *RAN, "kv_cache", "new_tokens"))
SPEEDUP = MetricsFile("speedup", records=(), provenance=False)  # report's ratios, by bench run

KINDS = {k.stage: k for k in (PREPARE, EXPORT, SENSITIVITY, QUANTIZE, EVALUATE, EXPORT_NPU, EXPORT_NPU_GEN, COMPILE,
                              COMPILE_GEN, GENIE, EXPORT_GENAI, EXPORT_GGUF, BENCH, BENCH_GEN, SPEEDUP)}


def device_root(device: str | None, root: Path = ROOT) -> Path:
    """Where a machine's metrics go: this one's (`metrics/`), or those of a device measuring the builder's artifacts
    (`antinet-npu device`, `bench --device`)."""
    if device is None:
        return root
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", device):
        raise AntinetError(f"device name {device!r} must be one folder name (letters, digits, '.', '_', '-'), e.g. "
                           "x-elite-laptop")
    return root / DEVICES / device


def devices(root: Path = ROOT) -> list[Path]:
    """Folders of results dropped in from other machines (metrics/devices/<device>/)."""
    return sorted(p for p in (root / DEVICES).glob("*") if p.is_dir())
