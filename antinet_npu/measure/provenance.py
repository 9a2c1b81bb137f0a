"""What ran: library versions, host, and peak memory, recorded in every metrics file."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from functools import cache

PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-qnn", "qai-appbuilder")


@cache
def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape results (None when absent), plus the QNN SDK bundled."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    out["qnn"] = qnn_sdk_version()
    from antinet_npu import __version__

    out["antinet_npu"] = __version__
    return out


def qnn_sdk_version() -> str | None:
    """The QNN SDK version onnxruntime-qnn bundles (None when it is not installed)."""
    try:
        from onnxruntime_qnn import build_and_package_info
    except ImportError:
        return None
    return getattr(build_and_package_info, "qnn_version", None)


@cache
def host() -> dict[str, str | int]:
    return {"os": platform.system(), "arch": platform.machine(), "cpu": cpu_name(), "cpu_count": os.cpu_count() or 0}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (10^6 bytes)."""
    if sys.platform == "win32":
        import psutil

        return psutil.Process().memory_info().peak_wset / 1e6
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1e3 if sys.platform != "darwin" else kb / 1e6


def wall_seconds() -> float:
    """Wall time since this process started (a stage runs in a process of its own): imports and loading included."""
    import psutil

    return time.time() - psutil.Process().create_time()


def record(**metrics):
    """`metrics` plus the stage's wall time so far, peak memory, host and versions: the tail every metrics file
    carries."""
    return {**metrics, "wall_seconds": round(wall_seconds(), 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "host": host(), "versions": versions()}
