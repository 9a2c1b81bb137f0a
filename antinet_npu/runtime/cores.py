"""Independent calls spread over worker processes, one pinned to each core.

Why: the x86_64 HTP emulator runs one graph call on two threads that barely scale. On a 2-core machine an AR-64
SmolLM2 part takes 5.6 s per call in one process; two processes pinned to one core each take 6.8 s per call side by
side, 3.4 s effective (1.65x). Threads in one process gain nothing. So emulator verification gives each worker an
interleaved share of the items (balanced when their costs differ) and puts the results back in order.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from antinet_npu import AntinetError

_worker_peak_mb = 0.0


def available() -> list[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def spread(fn: Callable[[Any], Any], items: Sequence, workers: int) -> list:
    """[fn(x) for x in items], computed by up to `workers` spawned processes (one per core, at most one per item).

    `fn` must pickle (a module-level function or a small object whose state is plain data): each worker unpickles
    it once and calls it on its share, so it can open sessions lazily and reuse them. With one worker it runs here.
    A worker's exception is raised here; a worker that dies is an error naming its exit code; Ctrl-C or SIGTERM
    here kills the workers.
    """
    items = list(items)
    cores = available()
    n = max(1, min(workers, len(cores), len(items)))
    if n == 1:
        return [fn(x) for x in items]
    # spawn, not fork: onnxruntime and the QNN plugin hold threads and handles that do not survive a fork
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    try:
        for k in range(n):
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(fn, items[k::n], cores[k], send), daemon=True)
            proc.start()
            send.close()  # the worker holds the only writer: its death ends our read
            procs.append(proc)
            pipes.append(receive)
        out: list = [None] * len(items)
        for k, (proc, pipe) in enumerate(zip(procs, pipes)):
            try:
                ok, value, peak_mb = pipe.recv()
            except EOFError:
                proc.join()
                raise AntinetError(f"a worker process died (exit code {proc.exitcode}) before returning its "
                                   f"{len(items[k::n])} item(s): see its output above") from None
            global _worker_peak_mb
            _worker_peak_mb = max(_worker_peak_mb, peak_mb)
            if not ok:
                raise value
            out[k::n] = value
        return out
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


def _worker(fn: Callable[[Any], Any], share: list, core: int, send) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills its workers
    if sys.platform == "linux":  # a parent killed with -9 takes its workers along instead of leaving them running
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    try:
        result = (True, [fn(x) for x in share])
    except Exception as exc:  # raised in the parent; an exception that does not pickle travels as its text
        try:
            pickle.dumps(exc)
            result = (False, exc)
        except Exception:
            result = (False, AntinetError(f"{type(exc).__name__}: {exc}"))
    send.send((*result, _own_peak_rss_mb()))
    send.close()


def worker_peak_rss_mb() -> float:
    """Peak resident memory of the largest worker process `spread` has run in this process so far, in MB."""
    return _worker_peak_mb


def _own_peak_rss_mb() -> float:
    """This process's peak since it was spawned. Not getrusage: its high-water mark counts the parent's pages that
    the fork before exec mapped, and survives the exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1e3
    except (OSError, StopIteration, ValueError):
        from antinet_npu.measure.provenance import peak_rss_mb

        return peak_rss_mb()
