"""An idle node sleeps: its threads block on their sockets and queues instead of spinning.

Every node's RPC thread once busy-looped (its wake pipe was never drained, so poll() returned at once
forever): an idle node burnt a whole core and, under load, fought the engine loop for the GIL. Measured from
the outside over real `pdserve up` processes: CPU seconds (user + system, all threads) per wall second while
no request runs.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.harness.servers import UpCluster, needs_nodes

pytestmark = [pytest.mark.slow, needs_nodes]

IDLE_CORE_LIMIT = 0.2  # a fifth of a core: heartbeats, reapers and ticks only
WINDOW_S = 3.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted after the comm
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def test_idle_nodes_use_under_a_fifth_of_a_core(tmp_path, tiny_model):
    cluster = UpCluster(tmp_path / "idle", tiny_model, 1, 1)
    try:
        time.sleep(1.0)  # let start-up work (warm-up, first heartbeats) finish
        pids = {n["name"]: n["pid"] for n in cluster.info["nodes"]}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.monotonic()
        time.sleep(WINDOW_S)
        elapsed = time.monotonic() - t0
        cores = {name: (cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()}
        assert set(cores) == {"prefill-0", "decode-0"}
        busy = {name: round(c, 3) for name, c in cores.items() if c >= IDLE_CORE_LIMIT}
        assert not busy, f"idle nodes using cores: {busy} (limit {IDLE_CORE_LIMIT})"
    finally:
        cluster.stop()
