"""cores.spread: emulator verification spread over pinned worker processes gives what one process would."""

from __future__ import annotations

import os
import pickle

import pytest

from antinet_npu import AntinetError
from antinet_npu.runtime import cores


def _square_where(x):
    if x < 0:
        raise AntinetError(f"bad item {x}")
    return x * x, os.getpid(), sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def test_results_come_back_in_order_from_pinned_workers():
    got = cores.spread(_square_where, range(7), workers=2)
    assert [g[0] for g in got] == [x * x for x in range(7)]
    if len(cores.available()) >= 2:
        pids = {g[1] for g in got}
        assert len(pids) == 2 and os.getpid() not in pids
        assert all(len(g[2]) == 1 for g in got)  # each worker on one core
    alone = cores.spread(_square_where, range(3), workers=1)
    assert [g[0] for g in alone] == [0, 1, 4] and {g[1] for g in alone} == {os.getpid()}


def test_a_worker_error_is_raised_here():
    with pytest.raises(AntinetError, match="bad item -1"):
        cores.spread(_square_where, [1, 2, -1, 3], workers=2)


def test_htp_graphs_pickle_without_their_sessions():
    from antinet_npu.build import qnn
    from antinet_npu.config import TargetConfig

    graphs = qnn.HtpGraphs(TargetConfig())
    graphs.sessions._open["x"] = (1, object())  # an open session does not travel to a worker
    copy = pickle.loads(pickle.dumps(graphs))
    assert copy.sessions._open == {} and copy.target == graphs.target and copy.sessions.open_graph.__self__ is copy


def _die(x):
    os._exit(3)


@pytest.mark.skipif(len(cores.available()) < 2, reason="one core: the item would run in this process")
def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(AntinetError, match=r"a worker process died \(exit code 3\)"):
        cores.spread(_die, [1, 2], workers=2)


def _allocate(mb):
    block = b"\1" * (mb * 1_000_000)  # written: resident
    return len(block)


@pytest.mark.skipif(len(cores.available()) < 2 or not os.path.exists("/proc/self/status"),
                    reason="needs 2 cores and Linux")
def test_the_workers_peak_memory_is_their_own():
    held = b"\1" * 400_000_000  # this process is large; a worker's peak must not count it
    cores.spread(_allocate, [50, 50], workers=2)
    assert 50 < cores.worker_peak_rss_mb() < 400
    del held
