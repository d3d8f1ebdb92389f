"""Cache-aware routing on a real 2 prefill + 2 decode cluster: a request whose prefix a node holds goes to
that node (cached_tokens > 0, the Redis index holds the prefix's block hashes); with round_robin it does
not."""

from __future__ import annotations

import time

import httpx
import pytest

from pdserve.proxy.dispatch import prompt_block_hashes
from tests.harness.servers import RedisServer, free_port, needs_nodes, wait_for

pytestmark = [pytest.mark.slow, needs_nodes]

FAMILIES = [
    f"Family {k} shares this long system preamble about topic number {k} and its many details. " * 4
    for k in range(3)
]


def complete(url: str, prompt: str) -> tuple[str, int]:
    r = httpx.post(
        url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0}, timeout=60
    )
    assert r.status_code == 200, r.text
    return r.headers["x-pdserve-route"], r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def nodes_of(route: str) -> set[str]:
    _, pair = route.split(":", 1)
    return set(pair.split("->"))


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_known_prefix_goes_to_its_holder(policy, up_cluster, request, tiny_model):
    from pdserve.wire.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_model)
    redis = None
    args = ["--routing", policy]
    if policy == "cache_aware":
        redis = RedisServer(free_port()).start()
        request.addfinalizer(redis.stop)
        args += ["--redis-url", redis.url]
    cluster = up_cluster(2, 2, *args)
    outcomes = []
    for _k, family in enumerate(FAMILIES):
        warm_route, warm_cached = complete(cluster.url, family + "First question?")
        assert warm_route.startswith("disaggregated") and warm_cached == 0
        hashes = prompt_block_hashes(tok.encode(family), 16)
        if redis is not None:
            client = redis.client()
            holders = wait_for(
                lambda client=client, hashes=hashes: {
                    m.decode() for m in client.smembers(f"pdserve:block:{hashes[-1]}")
                },
                10,
                what="the prefix's hashes in Redis",
            )
            assert holders & nodes_of(warm_route), (holders, warm_route)
        else:
            time.sleep(0.5)  # the same settling time for the events to reach the proxy
        route, cached = complete(cluster.url, family + "Second, different question?")
        outcomes.append((warm_route, route, cached))
    if policy == "cache_aware":
        for warm_route, route, cached in outcomes:
            assert cached >= 16 * 8, outcomes  # most of the shared prefix came from cache
            assert nodes_of(route) & nodes_of(warm_route), outcomes
        assert "route:" in cluster.proxy_log() and "hits" in cluster.proxy_log()
    else:
        for warm_route, route, cached in outcomes:
            assert cached == 0, outcomes
            assert not nodes_of(route) & nodes_of(warm_route), outcomes
