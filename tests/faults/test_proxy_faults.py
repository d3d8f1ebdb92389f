"""Faults through real `pdserve up` clusters: a prefill node killed mid-request (re-routed, and new requests
go to the live node), a decode node killed mid-stream (a clear error, no hang), a client that disconnects (its
blocks freed on both nodes, seen through the nodes' /metrics and /health), and Redis stopped (the proxy keeps
serving from its in-process view and says so in its log and metrics)."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest

from tests.harness.servers import RedisServer, free_port, needs_nodes, wait_for

pytestmark = [pytest.mark.slow, needs_nodes]

LONG = "A long prompt so that the request is disaggregated and its KV moves between the nodes. " * 3


def complete(url: str, prompt: str, **kw):
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    body.update(kw)
    return httpx.post(url + "/v1/completions", json=body, timeout=90)


def used_blocks(metrics: str) -> float:
    m = re.search(r"^pdserve_node_kv_blocks_used (\S+)$", metrics, re.M)
    assert m, "pdserve_node_kv_blocks_used missing from the node's /metrics"
    return float(m.group(1))


def test_prefill_node_killed_mid_request(up_cluster, tiny_model, hf_reference):
    from pdserve.wire.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model)
    cluster = up_cluster(2, 1, "--routing", "round_robin")
    probe = complete(cluster.url, LONG + "probe")
    assert probe.status_code == 200
    used = probe.headers["x-pdserve-route"].split(":")[1].split("->")[0]
    victim = "prefill-1" if used == "prefill-0" else "prefill-0"  # round robin: the next request goes there
    survivor = used
    prompt = LONG + "the request whose prefill node dies"
    expected = hf_reference(tok.encode(prompt), 8)
    cluster.signal(victim, signal.SIGSTOP)  # hold it mid-request, then kill it
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", complete(cluster.url, prompt)))
    started = time.monotonic()
    t.start()
    time.sleep(0.5)
    cluster.kill9(victim)
    t.join(60)
    assert not t.is_alive(), "the request hung after its prefill node died"
    r = result["r"]
    assert r.status_code == 200, r.text  # re-routed before the first token
    assert r.json()["choices"][0]["token_ids"] == expected
    assert time.monotonic() - started < 30
    for i in range(4):
        again = complete(cluster.url, LONG + f"after the failure {i}")
        assert again.status_code == 200
        route = again.headers["x-pdserve-route"]
        assert victim not in route and (survivor in route or route.startswith("colocated")), route
    health = httpx.get(cluster.url + "/health").json()
    assert {n["node_id"]: n["alive"] for n in health["nodes"]}[victim] is False
    assert "pdserve_proxy_retries_total" in httpx.get(cluster.url + "/metrics").text


def test_decode_node_killed_mid_stream(up_cluster):
    from openai import APIError, OpenAI

    cluster = up_cluster(1, 1)
    client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    stream = client.completions.create(
        model=model, prompt=LONG, max_tokens=1500, stream=True, temperature=0, extra_body={"ignore_eos": True}
    )
    got = 0
    started = None
    with pytest.raises(APIError) as err:
        for _chunk in stream:
            got += 1
            if got == 5:
                cluster.kill9("decode-0")
                started = time.monotonic()
    assert started is not None and time.monotonic() - started < 10
    assert "decode" in str(err.value) and "stopped responding" in str(err.value)
    # new requests: a clear 503, quickly
    t0 = time.monotonic()
    r = httpx.post(cluster.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5
    wait_for(lambda: httpx.get(cluster.url + "/health").status_code == 503, 5, what="proxy health 503")


def test_client_disconnect_frees_blocks_on_both_nodes(up_cluster):
    cluster = up_cluster(1, 1)
    body = {"prompt": LONG, "max_tokens": 1500, "stream": True, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["x-pdserve-route"].startswith("disaggregated:prefill-0->decode-0")
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == 10:
                    assert used_blocks(cluster.node_metrics("decode-0")) > 0  # the request holds blocks now
                    break
    for name in ("decode-0", "prefill-0"):
        wait_for(
            lambda name=name: used_blocks(cluster.node_metrics(name)) == 0,
            10,
            what=f"{name} freeing the blocks",
        )
        h = cluster.node_health(name)
        assert h["num_used_blocks"] == 0 and h["num_running"] == 0 and h["num_waiting"] == 0
        assert h["num_free_blocks"] + h["num_used_blocks"] + h["num_cached_blocks"] == h["num_total_blocks"]
    metrics = cluster.node_metrics("decode-0")
    assert re.search(r'pdserve_node_requests_aborted_total\{cause="client(_gone)?"\} [1-9]', metrics), metrics
    assert 'pdserve_proxy_aborts_total{reason="client_gone"} 1.0' in httpx.get(cluster.url + "/metrics").text


def test_redis_stopped_proxy_keeps_serving(up_cluster, request):
    redis = RedisServer(free_port()).start()
    request.addfinalizer(redis.stop)
    cluster = up_cluster(1, 1, "--redis-url", redis.url)
    assert complete(cluster.url, LONG + "before").status_code == 200
    assert "pdserve_proxy_redis_up 1.0" in httpx.get(cluster.url + "/metrics").text
    wait_for(lambda: redis.client().keys("pdserve:block:*"), 10, what="hashes in Redis")
    redis.stop()
    for _i in range(4):
        r = complete(cluster.url, LONG + "before")  # a repeated prompt: still served, from the local view
        assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    metrics = httpx.get(cluster.url + "/metrics").text
    assert "pdserve_proxy_redis_up 0.0" in metrics
    assert httpx.get(cluster.url + "/health").json()["redis"] == "down"
    log = cluster.proxy_log()
    assert log.count("serving from the in-process view") == 1, log[-2000:]
