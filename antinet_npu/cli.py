"""`antinet-npu`: run one pipeline stage by hand, compose the config, and (later) verify and serve.

`dvc repro` runs the same stage commands listed in dvc.yaml; running them by hand is for debugging and one-off work.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from antinet_npu import AntinetError, __version__

# Stage name -> (one-line description, extra arguments). The stage modules live in the top-level `stages/` folder
# (installed as antinet_npu.stages) and are imported only when run, so --help stays fast.
DEVICE = ("--device", dict(metavar="NAME", help="write metrics/devices/NAME/... instead: a device measuring the "
                                              "builder's artifacts (see `antinet-npu device`)"))
STAGES: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "prepare": ("HF checkpoint (builtin, local directory or hub id) -> models/pytorch/<model>/", []),
    "export": ("PyTorch snapshot -> models/onnx/<model>.onnx, validated against PyTorch", []),
    "quantize": ("FP32 ONNX -> models/onnx/<model>-<precision>.onnx (a CPU variant)",
                 [("--precision", dict(required=True, help="a key of quantize.recipes, e.g. int8-block"))]),
    "evaluate": ("fidelity of a variant vs the FP32 ONNX model -> metrics/evaluate/<precision>.json",
                 [("--precision", dict(required=True, help="a key of evaluate.variants, e.g. fp32 or int8-block"))]),
    "sensitivity": ("per-layer-group damage of a quantization probe -> metrics/sensitivity/<probe>.json",
                    [("--probe", dict(required=True, help="a key of sensitivity.probes, e.g. int8-block"))]),
    "export-npu": ("PyTorch snapshot -> static-shape graph models/npu/<model>-s<S>.onnx for the NPU",
                   [("--seq-len", dict(required=True, type=int, help="static sequence length, e.g. 128"))]),
    "export-npu-gen": ("PyTorch snapshot -> the NPU's generation graphs models/npu-gen/<model>/ (AR-N prefill and "
                       "AR-1 decode per part, over a fixed context), checked against PyTorch greedy generation", []),
    "compile": ("static graph -> QDQ -> QNN context binary models/qnn/<model>-<precision>-s<S>_ctx.onnx + .bin, "
                "verified on the QNN HTP backend",
                [("--precision", dict(required=True, help="a key of compile.recipes, e.g. w8a16")),
                 ("--seq-len", dict(required=True, type=int, help="static sequence length, e.g. 128"))]),
    "compile-gen": ("the NPU generation parts -> QDQ -> one QNN context binary per part (AR-N and AR-1 over one "
                    "weight copy) in models/qnn-gen/<model>-<precision>/, verified on the QNN HTP backend",
                    [("--precision", dict(required=True, help="a key of compile.recipes, e.g. w8a16"))]),
    "genie": ("the compile-gen parts -> a Genie bundle models/genie/<model>-<precision>/ (genie_config.json, "
              "htp_backend_ext_config.json, tokenizer.json, weight_sharing_model_<i>_of_<n>.serialized.bin), checked "
              "by Genie itself",
              [("--precision", dict(required=True, help="a key of compile.recipes built by compile-gen, e.g. w8a16"))]),
    "bench": ("latency of one forward pass on one backend -> metrics/bench/<run>.json",
              [("--run", dict(required=True, help="a key of bench.runs, e.g. ort-cpu-int8-block-128")),
               DEVICE]),
    "export-genai": ("PyTorch snapshot -> models/genai/<model>-<precision>/ by onnxruntime-genai's model builder "
                     "(the CPU generation peer)",
                     [("--precision", dict(required=True, help="int4, int8, fp16 or fp32"))]),
    "export-gguf": ("PyTorch snapshot -> models/gguf/<model>-<type>.gguf for llama.cpp (the other CPU generation "
                    "peer), quantized by llama.cpp itself",
                    [("--type", dict(required=True, dest="file_type", help="q4_0, q8_0 or f16"))]),
    "bench-gen": ("prefill + decode: time to first token and decode tokens/s -> metrics/bench-gen/<run>.json",
                  [("--run", dict(required=True, help="a key of bench.generation.runs, e.g. ort-cpu-int8-block")),
                   DEVICE]),
    "report": ("reports/summary.md, reports/benchmark.json (the seed's schema) and plot data from the metrics", []),
}

EPILOG = """\
Config: stages read params.yaml (what DVC tracks). Hydra overrides after the command compose conf/ instead,
e.g. `antinet-npu prepare model=qwen2-1.5b model.source=/data/Qwen2-1.5B`. In the pipeline, prefer
`dvc repro` (rebuild what is stale) and `dvc exp run -S KEY=VALUE` (DVC composes conf/ into params.yaml).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="antinet-npu", description="Hugging Face causal LM -> ONNX, CPU variants and Hexagon NPU context "
        "binaries, with measured fidelity and latency.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"antinet-npu {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="libraries' INFO lines too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, (help_text, extra) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=f"Stage `{name}`: {help_text}.", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for flag, kwargs in extra:
            p.add_argument(flag, **kwargs)
        _config_arguments(p)

    p = sub.add_parser("verify", help="print the metrics table; exit 1 if a result is missing or unjudged, a "
                       "non-emulated run is over budget or a fidelity gate failed", description="The seed's "
                       "verify_compliance: reads metrics/ (bench, bench-gen, evaluate, compile, devices/), compares "
                       "with what params.yaml asks for, prints a table, exits 1 when a result is missing, damaged or "
                       "unjudged, a benchmark that did not run on an emulator is over its latency budget or a "
                       "variant failed its fidelity gate, 0 otherwise. Run from the project root.")
    p.add_argument("--metrics", default="metrics", help="metrics folder (default: metrics)")
    p.add_argument("--params", default="params.yaml", help="params file to read (default: params.yaml)")

    p = sub.add_parser("serve", help="HTTP API on one loaded model: OpenAI-compatible completions, metrics, dashboard",
                       description="Serve one model (serve.run: a key of bench.runs or bench.generation.runs). The "
                       "model loads in the background; model endpoints answer 503 until it is ready.\n\n"
                       "Endpoints:\n"
                       "  POST /v1/completions, /v1/chat/completions   OpenAI's protocol (stream: server-sent events)\n"
                       "  GET  /v1/models                              the served model\n"
                       "  POST /api/infer                              next-token top-k + greedy continuation\n"
                       "  GET  /api/performance/benchmark              single-pass latency at given lengths\n"
                       "  GET  /api/health                             status, backend, device, queue\n"
                       "  GET  /metrics                                Prometheus text\n"
                       "  GET  /api/stats, /dashboard                  recent requests (JSON) and a live page\n\n"
                       "Limits (serve.*): max_queue (429 beyond), request_timeout_s, max_body_kb (413), max_stop,\n"
                       "max_new_tokens; prefix_cache_mb; drain_s on SIGTERM; bench_every_s (idle benchmark).\n\n"
                       + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="bind address (serve.host, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (serve.port, default 8000)")
    p.add_argument("--run", help="the run to serve (serve.run), e.g. ort-cpu-int8-block or qnn-htp-w8a16")
    _config_arguments(p)

    p = sub.add_parser("device", help="on a device clone: fetch what the NPU runs load from the builder's DVC remote, "
                       "measure them into metrics/devices/NAME/", description="Run on the machine that measures (a "
                       "Windows-on-Snapdragon laptop): fetches from the DVC remote only what the runs load (the "
                       "tokenizer, binaries or Genie bundle and their signatures; sizes logged), nothing upstream "
                       "runs, then runs `bench` / `bench-gen --device NAME` for each, in its own process. Commit "
                       "metrics/devices/NAME/ and push it with git; `dvc repro report` on the builder ranks them.\n\n"
                       + EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="the device's folder under metrics/devices/, e.g. x-elite-laptop")
    p.add_argument("--run", action="append", default=[], dest="runs", metavar="KEY",
                   help="a key of bench.runs or bench.generation.runs (repeatable; default: every NPU run)")
    p.add_argument("--remote", help="the DVC remote to fetch from (default: the configured default remote)")
    p.add_argument("--no-fetch", dest="fetch", action="store_false",
                   help="use the artifacts already in the workspace")
    _config_arguments(p)

    sub.add_parser("fetch-text", help="fetch the text sources that come from the package registry (builtin:lee-news) "
                   "into the venv; `make install` runs it", description="Downloads the pinned wheel that carries a "
                   "builtin text (builtin:lee-news: gensim 4.4.0's Lee news corpus, 28 MB wheel, 360 kB kept), "
                   "checks the file's SHA-256 and keeps it under <venv>/share/antinet-npu/text/. Installs nothing.")

    p = sub.add_parser("compose", help="compose conf/ (plus overrides) as DVC does; print it or write params.yaml",
                       description="Compose conf/ with Hydra exactly as `dvc exp run` does and print the YAML; "
                       "--write replaces params.yaml with it.")
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra override, e.g. model=qwen2-1.5b")
    p.add_argument("--write", action="store_true", help="write params.yaml instead of printing")
    return parser


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                   help="Hydra override (e.g. export.opset=18); when given, conf/ is composed instead of reading "
                   "params.yaml")
    p.add_argument("--params", default="params.yaml", help="params file to read (default: params.yaml)")


def _stage_module(name: str):
    return importlib.import_module(f"antinet_npu.stages.{name}")


def _terminate(signum, _frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: staging folders and partial files are removed on the way out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:  # libraries' INFO lines (one per quantized node) would drown the stage's own
        for name in ("onnxruntime", "onnx", "transformers", "dvc", "httpx", "urllib3", "gguf"):
            logging.getLogger(name).setLevel(logging.WARNING)
        for handler in logging.getLogger().handlers:  # onnxruntime.quantization logs through the root logger
            handler.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return _dispatch(args)
    except AntinetError as exc:
        print(f"antinet-npu {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"antinet-npu {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permissions: the environment, not the code
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"antinet-npu {args.command}: error: {exc.strerror or exc}{where}: free disk space or fix the path, "
              "then re-run", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from antinet_npu import config

    if args.command == "verify":
        from pathlib import Path

        from antinet_npu.measure.verify import main as verify_main

        return verify_main(config.load(args.params), Path(args.metrics))
    if args.command == "fetch-text":
        from antinet_npu.build.corpus import REGISTRY_TEXTS

        for text in REGISTRY_TEXTS:
            logging.getLogger("fetch-text").info("%s: %s", text.source, text.fetch())
        return 0
    if args.command == "compose":
        text = config.to_yaml(config.compose(args.overrides))
        config.validate(config.compose(args.overrides), source="composed config")
        if args.write:
            from pathlib import Path

            from antinet_npu.artifacts import write_text

            write_text(Path(config.PARAMS_FILE), text)
        else:
            print(text, end="")
        return 0
    cfg = config.load(args.params, args.overrides)
    if args.command == "serve":
        try:
            import prometheus_client  # noqa: F401
            import uvicorn  # noqa: F401

            from antinet_npu.runtime import serve
        except ImportError as exc:
            raise AntinetError(f"the server needs the serve extra ({exc.name} is missing): pip install "
                               "'antinet-npu[serve]'") from None

        for key in ("host", "port", "run"):
            if getattr(args, key) is not None:
                setattr(cfg.serve, key, getattr(args, key))
        config.validate(cfg, source="command line")  # the flags obey the same rules as params
        return serve.main(cfg)
    if args.command == "device":
        from antinet_npu import sharing

        return 1 if sharing.run_on_device(cfg, args.name, args.runs, args.remote, args.fetch) else 0
    options = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "verbose", "overrides", "params")}
    _stage_module(args.command.replace("-", "_")).run(cfg, **options)
    return 0
