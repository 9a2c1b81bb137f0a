"""Stage `genie` (matrix over genie.precisions): compile-gen's parts -> a Genie bundle, checked by Genie.

models/genie/<model>-<precision>/ is laid out as Qualcomm AI Hub ships an LLM for Genie (see
`antinet_npu.runtime.genie`): the shipped weight-shared binaries under AI Hub's names, `genie_config.json`,
`htp_backend_ext_config.json`,
`tokenizer.json`, and `bundle.json` saying what they were built for. Genie cannot load weight-shared binaries on the
x86_64 HTP emulator, so the bundle also carries `genie_config.emulator.json`: the same dialog over the unshared
binaries of the very same graphs (compile-gen's verify/, by relative path), which Genie from the onnxruntime-qnn
wheel runs here. Its greedy tokens on compile-gen's held-out prompts are compared with our host loop over those
binaries (`genie_host_agreement`: the bundle is wired right) and with the FP32 parts (`genie_fp32_agreement`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from antinet_npu import AntinetError, artifacts
from antinet_npu.build import checkpoint, qnn
from antinet_npu.build.static_llm import check_built_for
from antinet_npu.config import Config
from antinet_npu.measure import fidelity
from antinet_npu.measure.provenance import record
from antinet_npu.metrics import GENIE
from antinet_npu.runtime import genie
from antinet_npu.signature import Signature

log = logging.getLogger("genie")

EMULATOR_CONFIG = "genie_config.emulator.json"
EMULATOR_HTP_CONFIG = "htp_backend_ext_config.emulator.json"
EMULATOR_CHECK = "emulator_check.json"


def run(cfg: Config, precision: str) -> dict:
    gen, model = cfg.compile.generation, cfg.model.name
    if precision not in cfg.genie.precisions:
        raise AntinetError(f"no Genie bundle is built at {precision!r}: genie.precisions has "
                           f"{', '.join(cfg.genie.precisions) or 'none'}")
    api = genie.api_version()  # fails first, in one line, when there is no Genie runtime
    src = artifacts.qnn_gen_dir(model, precision)
    n = gen.prefill_len
    shipped = {ar: [artifacts.qnn_gen_ctx(src, ar, i) for i in range(gen.parts)] for ar in (n, 1)}
    verify = {ar: [artifacts.qnn_gen_ctx(src, ar, i, verify=True) for i in range(gen.parts)] for ar in (n, 1)}
    for path in [p for group in (shipped, verify) for paths in group.values() for p in paths]:
        if not path.is_file():
            raise AntinetError(f"{path} not found: run `dvc repro compile-gen@{precision}` first")
        check_built_for(path, Signature.read(path), n, gen.context_length, gen.parts, f"compile-gen@{precision}")
    greedy_path = artifacts.qnn_gen_greedy(src)
    if not greedy_path.is_file():
        raise AntinetError(f"{greedy_path} not found: re-run `dvc repro compile-gen@{precision}`")
    greedy = json.loads(greedy_path.read_text())

    first = Signature.read(shipped[n][0])
    if first.rope.theta is None:
        raise AntinetError(f"{model}'s rotary embedding is not plain RoPE (scaled or NTK): Genie's rope-theta cannot "
                           "describe it, and this stage writes no positional-encoding block yet")
    snapshot = artifacts.pytorch_dir(model)
    model_config = checkpoint.snapshot_config(snapshot)
    eos = model_config.get("eos_token_id")
    eos_tokens = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
    tokenizer_src = snapshot / genie.TOKENIZER
    if not tokenizer_src.is_file():
        raise AntinetError(f"{tokenizer_src} not found: Genie needs the model's tokenizer.json; re-run `dvc repro "
                           "prepare`")
    pad = model_config.get("pad_token_id")
    pad = int(pad) if pad is not None else eos_tokens[0] if eos_tokens else 0
    bos = genie.prepended_bos(tokenizer_src)
    genie.check_special_tokens(tokenizer_src, [*eos_tokens, bos, pad])

    parts = [Signature.read(shipped[n][i]).part for i in range(gen.parts)]
    names = [p.graph_name(ar, gen.context_length) for ar in (n, 1) for p in parts]
    binaries = [sorted({b for ar in (n, 1) for b in qnn.context_binaries(shipped[ar][i])}) for i in range(gen.parts)]
    if gen.share and any(len(b) != 1 for b in binaries):
        raise AntinetError(f"{src} does not hold one shared binary per part: re-run "
                           f"`dvc repro compile-gen@{precision}`")
    bundle_names = [[genie.binary_name(i, gen.parts)] if gen.share else
                    [f"model_ar{ar}_{i + 1}_of_{gen.parts}.serialized.bin" for ar in (n, 1)]
                    for i in range(gen.parts)]

    out = artifacts.genie_dir(model, precision)
    start = time.perf_counter()
    with artifacts.staged_dir(out) as tmp:
        for sources, targets in zip(binaries, bundle_names):
            for source, target in zip(sources, targets):
                shutil.copyfile(source, tmp / target)
        shutil.copyfile(tokenizer_src, tmp / genie.TOKENIZER)
        bundle = genie.GenieBundle(
            model=model, precision=precision, context_length=gen.context_length, prefill_len=n, parts=gen.parts,
            n_vocab=int(model_config["vocab_size"]), bos_token=bos, eos_tokens=eos_tokens,
            pad_token=pad,
            kv_dim=first.kv.head_dim, rope_theta=first.rope.theta, soc_model=cfg.target.soc_model,
            dsp_arch=f"v{cfg.target.htp_arch}", qnn_sdk_version=qnn.sdk_version(shipped[n][0]), graphs=tuple(names),
            binaries=tuple(genie.BundleFile.of(tmp / t) for targets in bundle_names for t in targets),
            tokenizer=genie.BundleFile.of(tmp / genie.TOKENIZER))
        bundle.write(tmp)
        ctx_bins = [t for targets in bundle_names for t in targets]
        unshared = [b for ar in (n, 1) for ctx in verify[ar] for b in qnn.context_binaries(ctx)]
        emulated_bins = [_relative(b, out) for b in unshared]
        switching = cfg.genie.graph_switching
        artifacts.write_json(tmp / genie.CONFIG, bundle.dialog_config(ctx_bins, use_mmap=cfg.genie.use_mmap,
                                                                      n_threads=cfg.genie.n_threads,
                                                                      graph_switching=switching))
        artifacts.write_json(tmp / genie.HTP_CONFIG, bundle.htp_config(weight_sharing=gen.share))
        artifacts.write_json(tmp / EMULATOR_HTP_CONFIG, bundle.htp_config(weight_sharing=False))
        artifacts.write_json(tmp / EMULATOR_CONFIG, bundle.dialog_config(emulated_bins, extensions=EMULATOR_HTP_CONFIG,
                                                                         use_mmap=False, graph_switching=switching))
        build_seconds = time.perf_counter() - start

        log.info("checking the bundle with Genie %s%s over the unshared binaries: %d prompts x %d tokens", api,
                 " on the HTP emulator" if qnn.emulated() else "", len(greedy["prompts"]), greedy["new_tokens"])
        start = time.perf_counter()
        # the emulator config as genie-t2t-run started in the finished bundle would read it (paths made absolute)
        checked = bundle.dialog_config([str(b.resolve()) for b in unshared], tokenizer=str(tmp / genie.TOKENIZER),
                                       extensions=str(tmp / EMULATOR_HTP_CONFIG), use_mmap=False,
                                       graph_switching=switching)
        dialog = genie.Dialog(checked)
        try:
            order = dialog.graph_order()
            _check_order(order, parts, n, gen.context_length)
            got = [dialog.generate(p, greedy["new_tokens"]).tokens for p in greedy["prompts"]]
        finally:
            dialog.close()
        check_seconds = time.perf_counter() - start
        # what was checked, with Genie's own tokens: another Genie driver run on genie_config.emulator.json in this
        # folder must generate them
        artifacts.write_json(tmp / EMULATOR_CHECK, {"genie_api_version": api, "new_tokens": greedy["new_tokens"],
                                                   "prompts": greedy["prompts"], "genie": got})
        host = [_until_eos(t, eos_tokens) for t in greedy["host"]]
        fp32 = [_until_eos(t, eos_tokens) for t in greedy["fp32"]]
        versus_host = fidelity.generation_agreement(host, got)
        versus_fp32 = fidelity.generation_agreement(fp32, got)
        metrics = record(
            model=model, precision=precision, backend="genie", device=qnn.device_name(), emulated=qnn.emulated(),
            genie_api_version=api, qnn_sdk_version=bundle.qnn_sdk_version, runtime_qnn_version=genie.qnn_version(),
            soc_model=bundle.soc_model, dsp_arch=bundle.dsp_arch, prefill_len=n, context_length=gen.context_length,
            num_parts=gen.parts, shared=gen.share, checked_binaries="unshared (compile-gen verify/): the emulator "
            "cannot load weight-shared ones", bundle_mb=round(sum(f.bytes for f in bundle.binaries) / 1e6, 3),
            bins=len(bundle.binaries), graphs_in_order=len(order),
            gen_prompts=len(got), gen_tokens=greedy["new_tokens"],
            genie_host_agreement=versus_host.get("gen_agreement"),
            genie_host_first_divergence=versus_host.get("gen_first_divergence"),
            genie_prompts_equal_host=sum(a == b for a, b in zip(host, got)),
            genie_fp32_agreement=versus_fp32.get("gen_agreement"),
            genie_prompts_equal_fp32=sum(a == b for a, b in zip(fp32, got)),
            genie_load_seconds=round(dialog.load_seconds, 3), check_seconds=round(check_seconds, 2),
            build_seconds=round(build_seconds, 2))
        violations = _violations(metrics, cfg)
        metrics["gate_passed"] = not violations
        GENIE.write(metrics, precision)
        if violations and cfg.genie.mode == "fail":
            raise AntinetError("Genie check: " + "; ".join(violations) + " (bounds in genie)")
    if violations:
        log.warning("Genie check: %s", "; ".join(violations))
    log.info("%s: %d binaries, %.1f MB; Genie %s generated %d/%d prompts exactly as our host loop (agreement %.3f), "
             "agreement with the FP32 parts %.3f%s", out, len(bundle.binaries), metrics["bundle_mb"], api,
             metrics["genie_prompts_equal_host"], len(got), metrics["genie_host_agreement"] or 0.0,
             metrics["genie_fp32_agreement"] or 0.0, " (emulated)" if qnn.emulated() else "")
    return metrics


def _relative(path: Path, bundle: Path) -> str:
    """`path` as the bundle folder sees it (Genie opens ctx-bins relative to where it starts: the bundle)."""
    import os

    return Path(os.path.relpath(path.resolve(), bundle.resolve())).as_posix()


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    """Genie stops at an EOS token (not returned); the reference was generated without stopping."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens


def _check_order(order: list[tuple[str, int, int, int]], parts, prefill_len: int, context_length: int) -> None:
    """Genie must have placed part i's graphs at split i, for both AR variants (it orders graphs by name)."""
    expected = {(p.graph_name(ar, context_length), p.index, ar, context_length)
                for p in parts for ar in (prefill_len, 1)}
    if set(order) != expected:
        raise AntinetError(f"Genie placed the graphs as {sorted(order)}, expected {sorted(expected)}: the graph names "
                           "inside the binaries are wrong; re-run `dvc repro compile-gen`")


def _violations(metrics: dict, cfg: Config) -> list[str]:
    out = []
    for key, bound in (("genie_host_agreement", cfg.genie.min_host_agreement),
                       ("genie_fp32_agreement", cfg.genie.min_fp32_agreement.get(metrics["precision"]))):
        if bound is not None and (metrics[key] is None or metrics[key] < bound):
            out.append(f"{metrics['precision']} {key} {metrics[key]} < {bound}")
    return out
