"""`pdserve up` restarts a failed node: one whose process died, and one whose engine broke (a tensor-parallel
rank killed: the node lives on, its /health says unhealthy). It comes back on the same ports, the proxy serves
through it again, and after --max-restarts it is left dead and reported. CPU, tiny llama, real processes."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.e2e.test_tp_cluster import rank_processes
from tests.harness.servers import UpCluster, needs_nodes, wait_for

pytestmark = [pytest.mark.slow, needs_nodes]


def completion(cluster: UpCluster) -> httpx.Response:
    name = httpx.get(cluster.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    return httpx.post(
        cluster.url + "/v1/completions",
        json={"model": name, "prompt": "restart me", "max_tokens": 4, "temperature": 0},
        timeout=30,
    )


def restarted(cluster: UpCluster, name: str, old_pid: int, restarts: int) -> dict:
    """Wait until the state file shows `name` started again `restarts` times, and healthy; its entry."""

    def back():
        node = cluster.reload() and cluster.node(name)
        if node["pid"] == old_pid or node["restarts"] != restarts:
            return None
        try:
            return node if httpx.get(node["http"] + "/health", timeout=2).status_code == 200 else None
        except httpx.HTTPError:
            return None

    return wait_for(back, timeout=60, what=f"{name} restarted ({restarts})")


def test_a_dead_node_is_restarted_on_its_ports_then_left_dead_past_the_limit(tmp_path, tiny_model):
    cluster = UpCluster(
        tmp_path / "up", tiny_model, 0, 1, args=("--max-restarts", "1", "--routing", "round_robin")
    )
    try:
        before = cluster.node("decode-0")
        assert completion(cluster).status_code == 200
        os.kill(before["pid"], signal.SIGKILL)
        after = restarted(cluster, "decode-0", before["pid"], 1)
        assert (after["rpc"], after["events"], after["http"]) == (
            before["rpc"],
            before["events"],
            before["http"],
        )
        wait_for(lambda: completion(cluster).status_code == 200, timeout=30, what="served after the restart")
        os.kill(after["pid"], signal.SIGKILL)
        wait_for(lambda: "left dead after 1 restart(s)" in cluster.output(), timeout=30, what="given up")
        assert (
            "decode-0 (pid %d) exited with status -9; restarting it in 1 s" % before["pid"]
            in cluster.output()
        )
        time.sleep(1.5)  # past any backoff: no further restart
        assert cluster.reload() and cluster.node("decode-0")["pid"] == after["pid"]
    finally:
        cluster.stop()


def test_a_node_whose_rank_died_is_restarted(tmp_path, tiny_model):
    cluster = UpCluster(tmp_path / "up", tiny_model, 0, 1, args=("--decode-tp", "2"))
    try:
        node = cluster.node("decode-0")
        ranks = rank_processes(node["pid"])
        assert len(ranks) == 1
        os.kill(ranks[0], signal.SIGKILL)
        wait_for(lambda: completion(cluster).status_code != 200 or None, timeout=30, what="the node breaks")
        after = restarted(cluster, "decode-0", node["pid"], 1)
        assert "decode-0 (pid %d) is unhealthy (tensor-parallel rank 1 " % node["pid"] in cluster.output()
        assert len(rank_processes(after["pid"])) == 1
        wait_for(lambda: completion(cluster).status_code == 200, timeout=30, what="served after the restart")
        cluster.pids += ranks + rank_processes(after["pid"])
    finally:
        cluster.stop()
