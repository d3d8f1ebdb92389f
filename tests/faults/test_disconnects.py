"""Clients that leave before their answer: 50 non-streaming disconnects (n = 1 and n = 8, colocated and
disaggregated) end their node work (no choice runs on to max_tokens; used blocks back to zero on both nodes),
and the race behind the issue (a cancellation landing in the iteration the node's message arrives) is not
lost."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import httpx
import pytest

from pdserve.proxy.dispatch import ChoiceRun
from tests.harness.servers import UpCluster, needs_nodes, running, wait_for

LONG = "A long prompt so that the request is disaggregated and its KV moves between the nodes. " * 3


def test_cancellation_in_the_iteration_a_message_lands_is_not_swallowed():
    async def main() -> str:
        run = ChoiceRun(
            SimpleNamespace(config=SimpleNamespace(request_timeout_s=60)),
            "r",
            [1, 2],
            {},
            deadline=asyncio.get_running_loop().time() + 60,
        )
        run.queue = asyncio.Queue()
        task = asyncio.create_task(run.next())
        await asyncio.sleep(0)  # the task now waits on the queue
        run.queue.put_nowait("a message")  # completes the get ...
        task.cancel()  # ... and the client leaves, in the same iteration
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "swallowed"

    assert asyncio.run(main()) == "cancelled"


def counter(metrics: str, name: str, label: str) -> float:
    m = re.search(rf"^{name}\{{{label}\}} (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def used_blocks(metrics: str) -> float:
    return float(re.search(r"^pdserve_node_kv_blocks_used (\S+)$", metrics, re.M).group(1))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_dir):
    with running(UpCluster(tmp_path_factory.mktemp("disconnects-1p1d"), model_dir, 1, 1)) as c:
        yield c


@pytest.mark.slow
@needs_nodes
def test_fifty_non_streaming_disconnects_end_their_node_work(cluster):
    url = cluster.url + "/v1/completions"
    assert httpx.post(url, json={"prompt": "warm up", "max_tokens": 2}, timeout=60).status_code == 200
    finished_by_length = {
        name: counter(cluster.node_metrics(name), "pdserve_node_requests_finished_total", 'reason="length"')
        for name in ("decode-0", "prefill-0")
    }
    outcomes = []
    for trial in range(50):
        body = {
            "prompt": LONG if trial % 2 else "Hello there",
            "max_tokens": 400,
            "n": 1 if trial < 25 else 8,
            "temperature": 0.7,
            "ignore_eos": True,
        }
        try:
            r = httpx.post(url, json=body, timeout=httpx.Timeout(60, read=0.4))  # leaves mid-generation
            outcomes.append(r.status_code)  # refused at once (a node still freeing the last one's blocks)
        except httpx.ReadTimeout:
            outcomes.append("left")
    assert outcomes.count("left") >= 40 and 200 not in outcomes, outcomes
    for name in ("decode-0", "prefill-0"):
        wait_for(
            lambda name=name: used_blocks(cluster.node_metrics(name)) == 0, 10, what=f"{name} back to idle"
        )
        metrics = cluster.node_metrics(name)
        # No choice ran on to max_tokens for a client that had left.
        assert (
            counter(metrics, "pdserve_node_requests_finished_total", 'reason="length"')
            == finished_by_length[name]
        ), name
    proxy_metrics = httpx.get(cluster.url + "/metrics").text
    assert counter(proxy_metrics, "pdserve_proxy_aborts_total", 'reason="client_gone"') >= outcomes.count(
        "left"
    )
