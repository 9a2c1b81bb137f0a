"""Each stage's code dependencies, read from its imports: what `dvc.yaml` must list so that a change to any module a
stage runs makes that stage stale.

The closure is static (every `import` in a module, function-level ones included: a lazy import still runs; a module
named in a string, as `python -m antinet_npu.build.genai_builder` in a subprocess, counts too), within
this project only (`antinet_npu/...` and `stages/...`, which installs as `antinet_npu.stages`). A few modules are left
out on purpose, each for the reason in `EXCLUDED`.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "antinet_npu"

# Modules every stage imports whose changes reach outputs only through what the deps already track.
EXCLUDED = {
    "antinet_npu/__init__.py": "AntinetError and the version string: an error message or version bump changes no "
                               "output (metrics record versions from package metadata at run time)",
    "antinet_npu/config": "the config schema: its values reach every stage through params.yaml (a changed default "
                          "changes params.yaml, which the stage's params keys track)",
    "antinet_npu/measure/provenance.py": "host and versions written beside every metric: a change re-running all 60 "
                                         "stages would measure nothing new",
    "antinet_npu/runtime/cores.py": "which cores ORT threads pin to: a timing knob, not an output",
    "stages/__init__.py": "empty package marker",
}


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name, or None when it is not this project's."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = ROOT / "stages" / Path(*parts[2:]) if parts[1:2] == ["stages"] else ROOT / Path(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dotted(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts] if parts[0] == "stages" else parts)


@cache
def imports(path: Path) -> frozenset[Path]:
    """Project files `path` imports directly (`from pkg import name` counts `pkg.name` when that is a module)."""
    found: set[Path] = set()
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PACKAGE + "."):
            # `python -m antinet_npu.x` in a subprocess, or "antinet_npu.x:Class" imported by name, runs that module
            names = [node.value.partition(":")[0]]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # `import antinet_npu.runtime.backends.genie` also runs antinet_npu/runtime/backends/__init__.py
            pieces = name.split(".")
            for i in range(1, len(pieces) + 1):
                if (file := module_file(".".join(pieces[:i]))) is not None:
                    found.add(file)
    found.discard(path)
    return frozenset(found)


def closure(path: Path) -> set[Path]:
    """`path` and every project file it imports, directly or not; an excluded module's own imports are not followed
    (what config imports to validate names is not what a stage runs)."""
    seen, todo = {path}, [path]
    while todo:
        current = todo.pop()
        if current != path and excluded(current.relative_to(ROOT).as_posix()):
            continue
        for dep in imports(current):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def excluded(rel: str) -> bool:
    return any(rel == e or rel.startswith(e.rstrip("/") + "/") for e in EXCLUDED)


def required(stage_module: Path) -> set[str]:
    """Repository-relative files a stage's code deps must cover."""
    return {rel for f in closure(stage_module) if not excluded(rel := f.relative_to(ROOT).as_posix())}


def covered(rel: str, deps: list[str]) -> bool:
    """Whether a listed dep (a file, or a folder covering every file under it) covers `rel`."""
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


def check(dvc_yaml: dict) -> list[str]:
    """One line per stage whose code deps differ from its import closure (empty: all agree)."""
    problems = []
    for name, stage in dvc_yaml["stages"].items():
        body = stage.get("do", stage)
        cmd = body["cmd"].split()
        if cmd[0] != "antinet-npu":
            continue
        module = ROOT / "stages" / f"{cmd[1].replace('-', '_')}.py"
        deps = [d for d in body.get("deps", []) if d.startswith(("antinet_npu", "stages/"))]
        need = required(module)
        missing = sorted(r for r in need if not covered(r, deps))
        extra = sorted(d for d in deps if not any(covered(r, [d]) for r in need))
        if missing:
            problems.append(f"stage {name}: dvc.yaml misses {', '.join(missing)} (imported by {module.name}'s code)")
        if extra:
            problems.append(f"stage {name}: dvc.yaml lists {', '.join(extra)}, which {module.name} never imports")
    return problems


def listing(stage_module: Path) -> list[str]:
    """What a stage's deps should say: its own module first, then the rest sorted, a folder named once when the
    stage needs every module in it."""
    need = required(stage_module)
    own = stage_module.relative_to(ROOT).as_posix()
    folders = {str(Path(r).parent) for r in need if Path(r).parent != Path(own).parent}
    whole = sorted(f for f in folders if f != PACKAGE and all(
        (rel := p.relative_to(ROOT).as_posix()) in need or excluded(rel) for p in (ROOT / f).glob("*.py")))
    rest = sorted(r for r in need - {own} if not covered(r, whole))
    return [own, *sorted(rest + whole)]


def rewrite(text: str) -> str:
    """dvc.yaml with each `antinet-npu` stage's code deps replaced by `listing` (comments and other deps kept)."""
    import yaml

    stages = yaml.safe_load(text)["stages"]
    out: list[str] = []
    stage = None
    in_deps = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if indent == 2 and stripped.endswith(":") and not stripped.startswith("#"):
            stage, in_deps = stripped[:-1], False
        elif stripped == "deps:":
            in_deps, written = True, False
            dep_indent = None
        elif in_deps and stripped.startswith("- "):
            dep_indent = indent
            if stripped[2:].split("#")[0].strip().startswith((PACKAGE, "stages/")):
                body = stages[stage].get("do", stages[stage])
                if not written and body["cmd"].startswith("antinet-npu "):
                    module = ROOT / "stages" / f"{body['cmd'].split()[1].replace('-', '_')}.py"
                    out.extend(" " * indent + f"- {dep}\n" for dep in listing(module))
                    written = True
                continue
        elif in_deps and stripped and not stripped.startswith("#") and dep_indent is not None and indent < dep_indent:
            in_deps = False
        out.append(line)
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m antinet_npu.stage_deps [--write]`: check dvc.yaml's code deps against the imports (or rewrite
    them)."""
    import sys

    import yaml

    args = sys.argv[1:] if argv is None else argv
    path = ROOT / "dvc.yaml"
    if args == ["--write"]:
        path.write_text(rewrite(path.read_text()))
    problems = check(yaml.safe_load(path.read_text()))
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("fix: python -m antinet_npu.stage_deps --write", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
