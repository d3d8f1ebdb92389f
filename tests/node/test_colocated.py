"""A colocated node (kv_both) as a real process, driven by a DEALER that plays the proxy: greedy tokens equal
transformers' greedy, prefix hits, abort / deadline / client-gone free every block, heartbeats and KV
events."""

from __future__ import annotations

import json

import msgpack
import pytest
import zmq

from tests.harness.nodes import (
    FakeProxy,
    assert_blocks_balanced,
    hf_greedy,
    prompts,
    start_node,
    wait_for,
    wait_healthy,
)
from tests.harness.servers import free_port

pytestmark = pytest.mark.slow
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def node(model_dir, tmp_path_factory):
    # vLLM's --kv-events-config too: the node then also publishes on a PUB socket of its own
    events = f"tcp://127.0.0.1:{free_port()}"
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": events, "topic": "kv-events"}
    node = start_node(
        "decode",
        model_dir,
        str(tmp_path_factory.mktemp("node-logs")),
        kv_role="kv_both",
        extra=["--kv-events-config", json.dumps(config)],
    )
    node.vllm_events = events
    try:
        wait_healthy(node)
        yield node
    finally:
        node.stop()


def test_concurrent_greedy_requests_match_transformers(node, proxy, model_dir):
    batch = prompts(1, [3, 17, 33, 50])
    rids = [
        proxy.generate(node, p, max_tokens=MAX_TOKENS, logprobs=2 if i == 0 else None)
        for i, p in enumerate(batch)
    ]
    results = proxy.wait(*rids)
    assert [r.token_ids for r in results] == hf_greedy(model_dir, batch, MAX_TOKENS)
    for r in results:
        assert r.error is None and r.finish_reason == "length"
        assert set(r.timings) >= {"prefill_queue", "prefill", "transfer", "exposed_transfer", "decode_queue"}
        assert r.timings["transfer"] == 0.0
    first = results[0]
    assert len(first.logprobs) == MAX_TOKENS
    top_ids, top_lps, lp, rank = first.logprobs[0]
    assert top_ids[0] == first.token_ids[0] and rank == 1 and len(top_ids) == 2
    assert_blocks_balanced(node)


def test_repeated_long_prompt_hits_the_prefix_cache(node, proxy):
    prompt = prompts(2, [70])[0]
    (first,) = proxy.wait(proxy.generate(node, prompt))
    (second,) = proxy.wait(proxy.generate(node, prompt))
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64  # four full 16-token blocks; the last token is always computed
    assert first.token_ids == second.token_ids
    assert_blocks_balanced(node)


def test_abort_mid_stream_frees_every_block(node, proxy):
    rid = proxy.generate(node, prompts(3, [40])[0], max_tokens=1000)
    proxy.wait_tokens(rid, 3)
    assert node.blocks()["used"] > 0
    proxy.abort(node, rid)
    (result,) = proxy.wait(rid)
    assert result.finish_reason == "abort" and result.error is None
    assert wait_for(lambda: node.blocks()["used"] == 0)
    assert_blocks_balanced(node)
    assert node.metrics()['pdserve_node_requests_aborted_total{cause="client"}'] >= 1


def test_deadline_ends_the_request_with_504(node, proxy):
    rid = proxy.generate(node, prompts(4, [20])[0], max_tokens=1000, deadline_s=0.3)
    (result,) = proxy.wait(rid, timeout=30)
    assert result.error is not None and result.error.status == 504 and not result.error.retryable
    assert wait_for(lambda: node.blocks()["used"] == 0)
    assert_blocks_balanced(node)


def test_client_gone_frees_its_requests(node, model_dir):
    gone = FakeProxy()
    rid = gone.generate(node, prompts(5, [30])[0], max_tokens=1000)
    gone.wait_tokens(rid, 2)
    gone.close()  # the DEALER disconnects: the node's next send is unroutable
    assert wait_for(lambda: node.blocks()["used"] == 0, timeout=15)
    assert_blocks_balanced(node)
    assert node.metrics()['pdserve_node_requests_aborted_total{cause="client_gone"}'] >= 1


def test_bad_requests_get_400_and_lose_nothing(node, proxy):
    from pdserve.wire.node_messages import Generate

    bad_params = proxy.track("bad-params")
    proxy.send(node, Generate(request_id=bad_params, prompt_token_ids=[1, 2, 3], params={"temperature": -1}))
    too_big = proxy.generate(node, [1, 2, 10**6])
    ok = proxy.generate(node, [5, 6, 7])
    results = proxy.wait(bad_params, too_big, ok)
    assert results[0].error.status == 400 and results[1].error.status == 400
    assert results[2].finish_reason == "length" and len(results[2].token_ids) == 8
    assert_blocks_balanced(node)


def test_heartbeats_and_kv_events_are_published(node, proxy):
    from pdserve.wire.kv_events import BlockStored, decode_batch
    from pdserve.wire.node_messages import decode_heartbeat

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for topic in (b"heartbeat", b"kv-events"):
        sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(node.events)
    vllm_sub = ctx.socket(zmq.SUB)  # --kv-events-config's publisher, as a vLLM indexer would subscribe
    vllm_sub.setsockopt(zmq.LINGER, 0)
    vllm_sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    vllm_sub.connect(node.vllm_events)
    try:
        heartbeat = _next(sub, b"heartbeat")
        hb = decode_heartbeat(heartbeat[-1])
        assert hb.role == "both" and hb.rpc == node.rpc and hb.http == node.http and hb.block_size == 16
        assert len(heartbeat[1]) == 8  # the sequence number
        prompt = prompts(6, [48])[0]
        proxy.wait(proxy.generate(node, prompt))
        stored = []
        while not stored:
            batch = decode_batch(_next(sub, b"kv-events")[-1])
            stored = [
                e for e in batch.events if isinstance(e, BlockStored) and e.token_ids[:16] == prompt[:16]
            ]
        assert len(stored[0].token_ids) == 16 * len(stored[0].block_hashes)
        seen = []  # the same BlockStored on the vLLM-format publisher, with a sequence number
        while not seen:
            topic, seq, payload = _next(vllm_sub, b"kv-events")
            seen = [e for e in decode_batch(payload).events if e in stored]
        assert len(seq) == 8
    finally:
        vllm_sub.close(0)
        sub.close(0)
        ctx.term()


def _next(sub, topic: bytes, timeout: float = 10.0):
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if poller.poll(200):
            parts = sub.recv_multipart()
            if parts[0] == topic:
                return parts
    raise TimeoutError(f"no {topic!r} message in {timeout}s")


def test_heartbeat_payload_is_plain_msgpack(node):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
    sub.connect(node.events)
    try:
        payload = msgpack.unpackb(_next(sub, b"heartbeat")[-1])
        assert payload["total_blocks"] >= payload["free_blocks"] > 0
    finally:
        sub.close(0)
        ctx.term()
