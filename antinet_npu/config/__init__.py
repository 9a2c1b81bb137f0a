"""The one typed config tree, loaded from `params.yaml` (or composed from `conf/`) and validated once.

`conf/` holds the Hydra config groups; `dvc exp run` composes them into `params.yaml`, which is what every stage
reads. Stages receive a `Config`, never raw dicts. Unknown keys, wrong types and bad values become an
`AntinetError` with a one-line message that names the key and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from antinet_npu import AntinetError
from antinet_npu.config.model import (
    BUILTIN_PREFIX,
    MAIN_DOMAIN,
    BuiltinModelConfig,
    ExportConfig,
    ModelConfig,
    TextConfig,
)
from antinet_npu.config.npu import (
    HTP_PERF_MODES,
    CompileConfig,
    GenerationGraphsConfig,
    GenieConfig,
    QdqRecipeConfig,
    TargetConfig,
)
from antinet_npu.config.recipes import (
    REFERENCE,
    EvaluateConfig,
    GateConfig,
    MixedConfig,
    ProbeConfig,
    QuantizeConfig,
    RecipeConfig,
    SensitivityConfig,
    SmoothConfig,
)
from antinet_npu.config.runs import (
    BACKENDS,
    GENAI_PRECISIONS,
    BenchConfig,
    BenchRunConfig,
    GenerationBenchConfig,
    GenRunConfig,
    ServeConfig,
)
from antinet_npu.config.schema import require

__all__ = ["BACKENDS", "BUILTIN_PREFIX", "CONF_DIR", "GENAI_PRECISIONS", "HTP_PERF_MODES", "MAIN_DOMAIN", "PARAMS_FILE",
           "REFERENCE",
           "BenchConfig", "BenchRunConfig", "BuiltinModelConfig", "CompileConfig", "Config", "EvaluateConfig",
           "ExportConfig", "GateConfig", "GenieConfig", "GenRunConfig", "GenerationBenchConfig",
           "GenerationGraphsConfig", "MixedConfig", "ModelConfig", "ProbeConfig", "QdqRecipeConfig", "QuantizeConfig",
           "RecipeConfig", "SensitivityConfig", "ServeConfig", "SmoothConfig", "TargetConfig", "TextConfig", "compose",
           "load", "to_yaml", "validate"]

CONF_DIR = "conf"
PARAMS_FILE = "params.yaml"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    genie: GenieConfig = field(default_factory=GenieConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)

    def check(self) -> None:
        recipes = [(f"quantize.recipes.{k}", r) for k, r in self.quantize.recipes.items()]
        recipes += [(f"compile.recipes.{k}", r) for k, r in self.compile.recipes.items()]
        for where, recipe in recipes:
            require(recipe.mixed is None or recipe.mixed.probe in self.sensitivity.probes,
                     f"{where}.mixed.probe {getattr(recipe.mixed, 'probe', '')!r} is not a key of sensitivity.probes "
                     f"(valid: {', '.join(self.sensitivity.probes) or 'none'})")
        for precision in self.genie.precisions:
            require(precision in self.compile.generation.precisions, f"genie.precisions lists {precision!r}, which "
                     "compile.generation.precisions does not build: add it there or drop it here")
        runs = [*self.bench.runs, *self.bench.generation.runs]
        require(self.serve.run in runs, f"serve.run {self.serve.run!r} is not a key of bench.runs or "
                 f"bench.generation.runs: choose one of {', '.join(runs)}")


def load(params: str | Path = PARAMS_FILE, overrides: list[str] | None = None) -> Config:
    """The validated config: `params.yaml` as DVC tracks it, or `conf/` composed with Hydra `overrides`."""
    if overrides:
        return validate(compose(overrides), source=f"{CONF_DIR}/ with overrides {' '.join(overrides)}")
    path = Path(params)
    require(path.is_file(), f"{path} not found: run from the project root, or write it with `antinet-npu compose`")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry multi-line context
        raise AntinetError(f"{path} is not valid YAML: {_first_line(exc)}") from None
    return validate(raw, source=str(path))


def validate(raw: Any, source: str) -> Config:
    """Merge `raw` onto the schema and build the typed tree; every failure is one line naming the key."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        cfg = OmegaConf.to_object(merged)
    except oc_errors.ConfigKeyError as exc:
        raise AntinetError(f"{source}: unknown key '{exc.full_key}'{_valid_keys_hint(exc.full_key)}") from None
    except oc_errors.MissingMandatoryValue as exc:
        raise AntinetError(f"{source}: required key '{exc.full_key}' is not set") from None
    except oc_errors.ValidationError as exc:
        raise AntinetError(f"{source}: bad value for '{exc.full_key}': {_first_line(exc)}") from None
    except oc_errors.OmegaConfBaseException as exc:
        raise AntinetError(f"{source}: {_first_line(exc)}") from None
    try:
        _check_tree(cfg)
    except AntinetError as exc:
        raise AntinetError(f"{source}: {exc}") from None
    assert isinstance(cfg, Config)
    return cfg


def _check_tree(node: Any) -> None:
    """Run every section's `check()` (value rules that types alone cannot express)."""
    if not is_dataclass(node):
        return
    for f in fields(node):
        _check_tree(getattr(node, f.name))
    if hasattr(node, "check"):
        node.check()


def compose(overrides: list[str] | None = None, conf_dir: str | Path = CONF_DIR) -> Any:
    """Compose `conf/` exactly as `dvc exp run` does (Hydra compose, then resolve)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    conf = Path(conf_dir).resolve()
    require(conf.is_dir(), f"config folder {conf} not found: run from the project root")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(conf), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise AntinetError(f"cannot compose {conf_dir}/: {_compose_hint(exc, conf)}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def to_yaml(cfg: Any) -> str:
    """YAML exactly as DVC writes `params.yaml` after composing."""
    return OmegaConf.to_yaml(cfg)


def _compose_hint(exc: Exception, conf: Path) -> str:
    msg = _first_line(exc)
    m = re.search(r"Could not find '([^/']+)/([^']+)'", str(exc))
    if m:
        group = m.group(1)
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        return f"no option '{m.group(2)}' in group '{group}' (choose one of: {', '.join(options)})"
    return msg


def _valid_keys_hint(full_key: str) -> str:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node: Any = Config
    for part in filter(None, parent.split(".")):
        hint = get_type_hints(node).get(part)
        node = next((a for a in (*get_args(hint), hint) if is_dataclass(a)), None)
        if node is None:
            return ""
    where = f"under '{parent}'" if parent else "at top level"
    return f" (valid keys {where}: {', '.join(f.name for f in fields(node))})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
