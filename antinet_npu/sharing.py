"""Builds shared through a DVC remote: which files a device needs for its runs, and fetching exactly those.

A device (a Windows-on-Snapdragon laptop) never rebuilds: it clones the repository, fetches the artifacts its runs
load from the builder's DVC remote, and measures. Everything here is checked before a byte lands in the workspace:
the remote is configured and reachable, this commit's dvc.lock has the outputs, and the remote holds every object.
Otherwise one line says which output, which stage makes it, and what to do; nothing is half-pulled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from antinet_npu import AntinetError, artifacts

log = logging.getLogger(__name__)
LOCK = Path("dvc.lock")
HOW_TO_ADD = ("add one with `dvc remote add -d shared /shared/dir` (or ssh://host/path, s3://bucket/path), the "
              "builder's; README, \"Sharing builds\"")


@dataclass(frozen=True)
class Output:
    """One output in dvc.lock: the stage that makes it, and its content hash (a `.dir` hash for a folder)."""

    path: str
    stage: str
    md5: str

    @property
    def is_dir(self) -> bool:
        return self.md5.endswith(".dir")


@dataclass(frozen=True)
class Needed:
    """A file a run loads: where it goes in the workspace, its hash, and the output (hence stage) it belongs to."""

    path: str
    md5: str
    output: Output


def locked_outputs(lock: Path = LOCK) -> dict[str, Output]:
    """Every output recorded in dvc.lock (what `dvc repro` built at this commit), by path."""
    if not lock.is_file():
        raise AntinetError(f"{lock} not found: this commit has no built pipeline; check out a commit the builder "
                           "reproduced and pushed")
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {o["path"]: Output(o["path"], stage, o["md5"])
            for stage, entry in stages.items() for o in entry.get("outs", []) if "md5" in o}


def owner(path: str, outputs: dict[str, Output]) -> tuple[Output, str]:
    """The output holding `path` (itself, or a folder above it) and the path inside that folder ("" for itself)."""
    p = PurePosixPath(path)
    for candidate in (p, *p.parents):
        if str(candidate) in outputs:
            return outputs[str(candidate)], str(p.relative_to(candidate)) if candidate != p else ""
    raise AntinetError(f"{path} is not an output in dvc.lock at this commit: the builder has not built it (add its "
                       "run to the config, `dvc repro`, commit, `dvc push`), or the path is wrong")


class Remote:
    """The DVC remote a clone fetches from, opened through DVC's own configuration."""

    def __init__(self, repo, name: str | None = None):
        self.repo = repo
        remotes = repo.config.get("remote", {})
        self.name = name or repo.config["core"].get("remote")
        if not remotes or not self.name:
            raise AntinetError(f"no DVC remote configured: {HOW_TO_ADD}")
        if self.name not in remotes:
            raise AntinetError(f"no DVC remote named {self.name!r} (configured: {', '.join(remotes)}): {HOW_TO_ADD}")
        self.url = remotes[self.name].get("url", "?")
        try:
            self.odb = repo.cloud.get_remote_odb(self.name, "fetch")
            fs = self.odb.fs
            reachable = fs.exists(fs.parent(fs.parent(self.odb.path)))  # the remote's root; objects: files/md5/
            self.empty = not fs.exists(self.odb.path)
        except Exception as exc:  # noqa: BLE001 - any filesystem's connection error: one line, named
            raise AntinetError(f"DVC remote {self.name!r} ({self.url}) is unreachable: "
                               f"{str(exc).splitlines()[0][:160]}") from None
        if not reachable:
            raise AntinetError(f"DVC remote {self.name!r} ({self.url}) is unreachable: check the path or host (the "
                               "builder's `dvc remote list`)")

    def has(self, md5s: list[str]) -> set[str]:
        """Which of these objects the remote holds."""
        return set(self.odb.oids_exist(md5s)) if md5s and not self.empty else set()

    def read_dir(self, out: Output) -> list[dict] | None:
        """A folder output's listing ({relpath, md5} per file), from the local cache or the remote; None when
        neither has it."""
        local = Path(self.repo.cache.local.oid_to_path(out.md5))
        try:
            text = local.read_text() if local.is_file() else \
                self.odb.fs.cat_file(self.odb.oid_to_path(out.md5)).decode()
        except FileNotFoundError:
            return None
        return json.loads(text)

    def listing(self, out: Output) -> list[str]:
        if (entries := self.read_dir(out)) is None:
            raise not_pushed([out], self)
        return [e["relpath"] for e in entries]


def not_pushed(outputs: list[Output], remote: Remote) -> AntinetError:
    named = "; ".join(f"{o.path} (stage {o.stage})" for o in outputs)
    return AntinetError(f"DVC remote {remote.name!r} ({remote.url}) lacks {named}: this commit's artifacts were never "
                        "pushed; on the builder, at this commit: `dvc repro` then `dvc push`")


def resolve(paths: list[str], remote: Remote, outputs: dict[str, Output]) -> tuple[list[Needed], set[Output]]:
    """Every file under `paths` (files, folders, or files inside a folder output) with its hash, and the folder
    outputs whose listing the remote lacks."""
    needed: dict[str, Needed] = {}
    unlisted: set[Output] = set()
    for path in paths:
        out, inside = owner(path, outputs)
        if not out.is_dir:
            needed[out.path] = Needed(out.path, out.md5, out)
            continue
        if (entries := remote.read_dir(out)) is None:
            unlisted.add(out)
            continue
        for entry in entries:
            rel = entry["relpath"]
            if not inside or rel == inside or rel.startswith(inside.rstrip("/") + "/"):
                needed[f"{out.path}/{rel}"] = Needed(f"{out.path}/{rel}", entry["md5"], out)
        if inside and not any(n.startswith(f"{out.path}/{inside}") for n in needed):
            raise AntinetError(f"{path} is not in {out.path} (stage {out.stage}) at this commit")
    return sorted(needed.values(), key=lambda n: n.path), unlisted


def fetch(remote: Remote, paths: list[str], outputs: dict[str, Output]) -> dict[str, int]:
    """Pull exactly `paths` from the remote into the workspace; returns bytes per path. Nothing is written when the
    remote lacks any of them."""
    needed, unlisted = resolve(paths, remote, outputs)
    have = remote.has(sorted({n.md5 for n in needed}))
    if missing := sorted(unlisted | {n.output for n in needed if n.md5 not in have}, key=lambda o: o.path):
        raise not_pushed(missing, remote)
    log.info("fetching %d files from DVC remote %r (%s)", len(needed), remote.name, remote.url)
    remote.repo.pull(targets=[n.path for n in needed], remote=remote.name)
    sizes = {p: sum(Path(n.path).stat().st_size for n in needed if n.path == p or n.path.startswith(p + "/"))
             for p in paths}
    for p, size in sizes.items():
        log.info("  %-64s %9.2f MB", p, size / 1e6)
    return sizes


def device_paths(cfg, runs: list[str], remote: Remote, outputs: dict[str, Output], emulated: bool) -> list[str]:
    """What the device's runs load: the tokenizer, and each run's model and weights. Of the NPU parts folder only
    the context wrappers and binaries (not the QDQ graphs); the unshared `verify/` ones only on the x86_64
    emulator, which cannot load the shared ones a device runs."""
    from antinet_npu.runtime.backends.registry import spec

    snapshot = artifacts.pytorch_dir(cfg.model.name).as_posix()
    paths = [f"{snapshot}/{name}" for name in ("tokenizer.json", "tokenizer_config.json", "config.json")]
    for key in runs:
        run = cfg.bench.runs.get(key) or cfg.bench.generation.runs.get(key)
        if run is None:
            raise AntinetError(f"no run {key!r} in bench.runs or bench.generation.runs: choose one of "
                               f"{', '.join([*cfg.bench.runs, *cfg.bench.generation.runs])}")
        for rel in dict.fromkeys((run.model, run.weights)):
            path = (artifacts.MODELS / rel).as_posix()
            if key in cfg.bench.generation.runs and spec(run.backend).generation == "qnn-parts":
                names = remote.listing(owner(path, outputs)[0])
                paths += [f"{path}/{n}" for n in names if "_ctx" in n and (emulated or not n.startswith("verify/"))]
            else:
                paths.append(path)
            if emulated and key in cfg.bench.generation.runs and spec(run.backend).generation == "genie":
                # the bundle's emulator config points at compile-gen's unshared binaries (genie_config.emulator.json)
                parts = artifacts.qnn_gen_dir(cfg.model.name, run.precision).as_posix()
                names = remote.listing(owner(parts, outputs)[0])
                paths += [f"{parts}/{n}" for n in names if n.startswith("verify/") and n.endswith("_qnn.bin")]
            if f"{path}.json" in outputs:  # its signature (`signature.py`): what the backend checks it against
                paths.append(f"{path}.json")
    return list(dict.fromkeys(paths))


def npu_runs(cfg) -> list[str]:
    """The runs only a device can measure for real: every run on an NPU backend."""
    from antinet_npu.runtime.backends.registry import spec

    return [k for runs in (cfg.bench.runs, cfg.bench.generation.runs) for k, r in runs.items()
            if spec(r.backend).unit == "NPU"]


def run_on_device(cfg, device: str, runs: list[str], remote_name: str | None = None, pull: bool = True) -> int:
    """Fetch what `runs` load from the builder's remote, then measure each in its own process (its own peak RSS)
    into metrics/devices/<device>/; nothing upstream runs. Returns the number of failed runs."""
    import subprocess
    import sys

    from dvc.repo import Repo

    from antinet_npu import metrics
    from antinet_npu.build import qnn

    where = metrics.device_root(device)  # a bad name fails before anything is fetched
    runs = runs or npu_runs(cfg)
    if not runs:
        raise AntinetError("no runs given and no NPU runs in bench.runs or bench.generation.runs: pass --run KEY")
    if pull:
        with Repo(".") as repo:
            remote, outputs = Remote(repo, remote_name), locked_outputs()
            sizes = fetch(remote, device_paths(cfg, runs, remote, outputs, qnn.emulated()), outputs)
        log.info("fetched %.2f MB for %d runs", sum(sizes.values()) / 1e6, len(runs))
    failed = []
    for key in runs:
        stage = "bench" if key in cfg.bench.runs else "bench-gen"
        log.info("%s --run %s on this device (%s)", stage, key, device)
        proc = subprocess.run([sys.executable, "-m", "antinet_npu", stage, "--run", key, "--device", device])
        if proc.returncode:
            failed.append(key)
    log.info("results in %s/: commit and push them (git), then `dvc repro report` on the builder ranks them%s",
             where, f"; FAILED: {', '.join(failed)}" if failed else "")
    return len(failed)
