"""Concurrent sequences (prompts x n) are bounded per request (400) and per API key (429), and a key's
sequences are given back when its request ends however it ends (here: the client leaves)."""

from __future__ import annotations

import httpx
import pytest

from tests.harness.fake_node import Script
from tests.harness.servers import wait_for


def test_sequences_per_request_and_per_key(fake_nodes, proxy_factory):
    node = fake_nodes("d0", "both")
    server = proxy_factory([node], max_seqs_per_request=8, max_seqs_per_key=8)
    server.wait_nodes(1)
    url = server.url + "/v1/completions"
    r = httpx.post(url, json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    node.script = Script(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"prompt": "x", "n": 6, "max_tokens": 2}, timeout=httpx.Timeout(10, read=0.5))
    # That client left: its 6 sequences are released, so 8 fit again.
    wait_for(lambda: not server.state.limits.in_use, 5, what="sequences released")
    node.script = Script()
    assert httpx.post(url, json={"prompt": "x", "n": 8, "max_tokens": 2}).status_code == 200


def test_a_key_over_its_sequences_is_429(fake_nodes, proxy_factory):
    import threading

    node = fake_nodes("d0", "both")
    node.script = Script(delay_s=0.5)
    server = proxy_factory([node], max_seqs_per_request=4, max_seqs_per_key=4)
    server.wait_nodes(1)
    url = server.url + "/v1/completions"
    first = threading.Thread(
        target=lambda: httpx.post(url, json={"prompt": "x", "n": 4, "max_tokens": 3}, timeout=30)
    )
    first.start()
    wait_for(lambda: server.state.limits.in_use, 5, what="the first request running")
    r = httpx.post(url, json={"prompt": "y", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sequences"
    first.join(30)
    assert httpx.post(url, json={"prompt": "y", "max_tokens": 2}).status_code == 200
