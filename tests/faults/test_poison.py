"""Poison requests (a stop id or prompt id past the 1,024-token vocabulary, the issue's
`{"min_tokens": 1, "stop_token_ids": [5000]}`) among 8 concurrent requests, colocated and disaggregated:
refused with a 4xx at the door (the proxy's, and a node's when the proxy is bypassed), never retried on
another node, every other request completes, and no node logs a failed step."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.harness.nodes import prompts, wait_for
from tests.harness.servers import UpCluster, needs_nodes, running

pytestmark = [pytest.mark.slow, needs_nodes]

POISONS = [{"min_tokens": 1, "stop_token_ids": [5000]}, {"stop_token_ids": [1024]}]
LONG = ("The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 3).strip()


def test_node_door_refuses_poison_among_eight_requests(nodes, proxy):
    prefill, decode = nodes
    good = []
    for i, p in enumerate(prompts(3, [40, 12, 40, 12, 40, 12, 40, 12])):
        mode = "disaggregated" if i % 2 == 0 else "colocated"
        good.append(
            proxy.generate(
                decode, p, mode=mode, prefill=prefill if mode == "disaggregated" else None, max_tokens=24
            )
        )
    bad = []
    for poison in POISONS:
        bad.append(proxy.generate(decode, [11, 12, 13], max_tokens=4, **poison))
        bad.append(
            proxy.generate(
                decode, prompts(4, [40])[0], mode="disaggregated", prefill=prefill, max_tokens=4, **poison
            )
        )
    bad.append(proxy.generate(decode, [11, 5000, 13], max_tokens=4))
    for result in proxy.wait(*good, timeout=120):
        assert result.error is None and result.finish_reason == "length" and len(result.token_ids) == 24
    for result in proxy.wait(*bad):
        assert result.error is not None and 400 <= result.error.status < 500, result
        assert not result.error.retryable and "vocabulary" in result.error.message
    for node in (prefill, decode):
        assert "engine step failed" not in node.log()
    assert wait_for(lambda: decode.blocks()["used"] == 0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, model_dir):
    with running(UpCluster(tmp_path_factory.mktemp("poison-1p1d"), model_dir, 1, 1)) as c:
        yield c


def stream(url: str, body: dict, out: list) -> None:
    text, done = [], False
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.extend(c.get("finish_reason") or "" for c in event["choices"])
    out.append((r.status_code, done, [t for t in text if t]))


def test_proxy_refuses_poison_while_eight_streams_complete(cluster):
    url = cluster.url + "/v1/completions"
    results: list = []
    threads = [
        threading.Thread(
            target=stream,
            args=(
                url,
                {
                    "prompt": LONG if i % 2 == 0 else "Hello",
                    "max_tokens": 24,
                    "temperature": 0,
                    "ignore_eos": True,
                },
                results,
            ),
        )
        for i in range(8)
    ]
    for t in threads:
        t.start()
    statuses = []
    for poison in POISONS + [{"prompt": [11, 5000]}]:
        for prompt in (LONG, "Hello"):
            body = {"prompt": prompt, "max_tokens": 4, **poison}
            r = httpx.post(url, json=body, timeout=60)
            statuses.append(r.status_code)
            assert r.json()["error"]["param"] in ("stop_token_ids", "prompt"), r.text
    for t in threads:
        t.join(180)
    assert statuses and all(s == 400 for s in statuses)
    assert len(results) == 8 and all(
        s == 200 and done and reasons == ["length"] for s, done, reasons in results
    )
    for node in cluster.info["nodes"]:
        with open(node["log_path"], errors="replace") as f:
            assert "engine step failed" not in f.read()
