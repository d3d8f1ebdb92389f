"""Routing: the pair score, conditional disaggregation, round robin, the prefix index (in process and in a
real Redis server), the indexer fed by real ZMQ publishers, and routing through the app with FakeNodes."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import msgpack
import pytest
import zmq

from pdserve.proxy.config import RouterConfig, RouterWeights
from pdserve.proxy.indexer import Indexer
from pdserve.proxy.nodes import NodeRegistry, NodeState
from pdserve.proxy.prefix_index import InProcessPrefixIndex, leading_runs
from pdserve.proxy.router import NoRoute, PairTerms, Router, score_pair
from pdserve.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, encode_batch
from pdserve.wire.node_messages import TOPIC_HEARTBEAT, TOPIC_KV_EVENTS, Generate, decode_heartbeat
from tests.harness.servers import RedisServer, free_port, wait_for


def node(node_id, role, **kw) -> NodeState:
    return NodeState(
        node_id,
        "tcp://x",
        role,
        f"tcp://{node_id}",
        "http://x",
        16,
        free_blocks=kw.pop("free", 100),
        total_blocks=100,
        **kw,
    )


# ---------------------------------------------------------------------------------------------------- score


def test_score_pair_terms_move_it_the_right_way():
    w = RouterWeights()
    base = PairTerms(512, 0, 0, 0, 0, 1.0, True)
    assert score_pair(PairTerms(512, 256, 0, 0, 0, 1.0, True), w) > score_pair(base, w)
    assert score_pair(PairTerms(512, 0, 256, 0, 0, 1.0, True), w) > score_pair(base, w)
    assert score_pair(PairTerms(512, 0, 0, 3, 0, 1.0, True), w) < score_pair(base, w)
    assert score_pair(PairTerms(512, 0, 0, 0, 5, 1.0, True), w) < score_pair(base, w)
    assert score_pair(PairTerms(512, 0, 0, 0, 0, 0.2, True), w) < score_pair(base, w)
    assert score_pair(PairTerms(512, 512, 512, 0, 0, 1.0, False), w) < score_pair(base, w)
    # a whole-prompt hit outweighs a few queued requests, not a long queue
    assert score_pair(PairTerms(512, 511, 0, 2, 0, 1.0, True), w) > score_pair(base, w)
    assert score_pair(PairTerms(512, 511, 0, 8, 0, 1.0, True), w) < score_pair(base, w)
    # weights come from config
    assert score_pair(PairTerms(512, 0, 0, 3, 0, 1.0, True), RouterWeights(prefill_queue=0)) == score_pair(
        base, RouterWeights(prefill_queue=0)
    )


def test_cache_aware_picks_the_prefill_node_holding_the_prefix():
    router = Router(RouterConfig(disagg_min_tokens=32))
    p0, p1, d0, d1 = node("p0", "prefill"), node("p1", "prefill"), node("d0", "decode"), node("d1", "decode")
    dec = router.decide(320, {"p1": 18}, 16, [p0, p1], [d0, d1])
    assert dec.mode == "disaggregated" and dec.prefill is p1
    assert dec.terms.prefill_hit_tokens == 288 and "p1" in dec.describe()
    # a loaded holder loses to an idle non-holder once its queue is long enough
    p1.num_waiting = 10
    assert router.decide(320, {"p1": 18}, 16, [p0, p1], [d0, d1]).prefill is p0


def test_a_holder_keeps_a_prefix_claim_only_while_its_backlog_is_smaller_than_the_claim():
    """Two colocated replicas, a holds 1024 of 1152 tokens: it wins while the tokens queued before this
    request on it are fewer than those the hit saves, and loses to an idle b past that (routing by the compute
    ahead of the first token, so popular prefixes do not all queue on one replica)."""
    router = Router(RouterConfig(disagg_min_tokens=32))
    a, b = node("a", "both"), node("b", "both")
    hits = {"a": 64}
    assert router.decide(1152, hits, 16, [], [a, b]).decode is a
    a.pending_prefill_tokens = 500  # less than a second prompt's worth: the hit still pays
    assert router.decide(1152, hits, 16, [], [a, b]).decode is a
    a.pending_prefill_tokens = 3 * 1152  # three whole prompts ahead of it: b computes ours sooner
    assert router.decide(1152, hits, 16, [], [a, b]).decode is b
    off = Router(RouterConfig(disagg_min_tokens=32, weights=RouterWeights(prefill_backlog=0)))
    assert off.decide(1152, hits, 16, [], [a, b]).decode is a  # the old policy kept piling onto a


def test_conditional_disaggregation():
    router = Router(RouterConfig(disagg_min_tokens=32))
    p0, d0, d1 = node("p0", "prefill"), node("d0", "decode"), node("d1", "decode")
    short = router.decide(20, {}, 16, [p0], [d0, d1])
    assert short.mode == "colocated" and short.prefill is None and short.reason == "short"
    held = router.decide(320, {"d1": 19, "p0": 20}, 16, [p0], [d0, d1])  # d1 holds 304 of 320 tokens
    assert held.mode == "colocated" and held.decode is d1 and held.reason == "decode_holds_prefix"
    alone = router.decide(320, {}, 16, [], [d0])
    assert alone.mode == "colocated" and alone.reason == "no_prefill_node"
    assert router.decide(320, {}, 16, [p0], [d0]).mode == "disaggregated"


def test_decode_node_without_room_is_avoided():
    router = Router(RouterConfig(disagg_min_tokens=32))
    p0, d0, d1 = node("p0", "prefill"), node("d0", "decode", free=2), node("d1", "decode", free=90)
    for _ in range(4):
        assert router.decide(320, {}, 16, [p0], [d0, d1]).decode is d1


def test_exclusions_and_no_route():
    router = Router(RouterConfig(disagg_min_tokens=32))
    p0, p1, d0 = node("p0", "prefill"), node("p1", "prefill"), node("d0", "decode")
    assert router.decide(320, {"p0": 19}, 16, [p0, p1], [d0], exclude={"p0"}).prefill is p1
    fallback = router.decide(320, {}, 16, [p0], [d0], exclude={"p0"})
    assert fallback.mode == "colocated" and fallback.decode is d0
    with pytest.raises(NoRoute):
        router.decide(320, {}, 16, [p0], [d0], exclude={"d0"})
    with pytest.raises(NoRoute):
        router.decide(320, {}, 16, [p0], [])


def test_ties_spread_and_round_robin_ignores_the_cache():
    router = Router(RouterConfig(disagg_min_tokens=32))
    ps, ds = [node("p0", "prefill"), node("p1", "prefill")], [node("d0", "decode"), node("d1", "decode")]
    picks = {
        (d.prefill.node_id, d.decode.node_id) for d in (router.decide(320, {}, 16, ps, ds) for _ in range(8))
    }
    assert len(picks) >= 2
    rr = Router(RouterConfig(policy="round_robin", disagg_min_tokens=32))
    seq = [rr.decide(320, {"p0": 19}, 16, ps, ds) for _ in range(4)]
    assert [d.prefill.node_id for d in seq] == ["p0", "p1", "p0", "p1"]
    assert [d.decode.node_id for d in seq] == ["d0", "d1", "d0", "d1"]
    assert rr.decide(10, {}, 16, ps, ds).mode == "colocated"


# ---------------------------------------------------------------------------------------------------- index


def test_leading_runs():
    assert leading_runs([{"a", "b"}, {"a"}, {"a", "b"}]) == {"a": 3, "b": 1}
    assert leading_runs([{"b"}, {"a"}]) == {"b": 1}
    assert leading_runs([{"a"}, {"a"}], node_ids=["b"]) == {}
    assert leading_runs([]) == {}


def _stored(hashes, bs=4):
    return BlockStored(
        block_hashes=hashes, parent_block_hash=None, token_ids=list(range(bs * len(hashes))), block_size=bs
    )


async def _exercise_index(index):
    def batch(*events):
        return KVEventBatch(ts=time.time(), events=list(events))

    await index.apply("n1", batch(_stored([1, 2, 3])))
    await index.apply("n2", batch(_stored([1, 2])))
    assert await index.match([1, 2, 3, 4]) == {"n1": 3, "n2": 2}
    assert await index.match([1, 2, 3], node_ids=["n2"]) == {"n2": 2}
    await index.apply("n1", batch(BlockRemoved(block_hashes=[2])))
    assert await index.match([1, 2, 3]) == {"n1": 1, "n2": 2}
    await index.apply("n2", batch(AllBlocksCleared()))
    assert await index.match([1, 2, 3]) == {"n1": 1}
    await index.drop_node("n1")
    assert await index.match([1, 2, 3]) == {}
    big = 2**64 - 1  # hashes are unsigned 64-bit
    await index.apply("n3", batch(_stored([big])))
    assert await index.match([big]) == {"n3": 1}


def test_in_process_index():
    asyncio.run(_exercise_index(InProcessPrefixIndex()))


def test_redis_index_against_a_real_server(redis_server):
    from pdserve.proxy.redis_index import RedisPrefixIndex

    async def go():
        index = RedisPrefixIndex(redis_server.url)
        await _exercise_index(index)
        assert index.up and index.errors == 0
        # a second proxy's index sees what the first one wrote
        await index.apply("n4", KVEventBatch(ts=0.0, events=[_stored([7, 8])]))
        other = RedisPrefixIndex(redis_server.url)
        assert await other.match([7, 8]) == {"n4": 2}
        assert await other.holders(8) == {"n4"}
        await other.close()
        await index.close()

    asyncio.run(go())
    keys = {k.decode() for k in redis_server.client().keys("pdserve:*")}
    assert "pdserve:block:7" in keys and "pdserve:node:n4" in keys


def test_redis_outage_falls_back_and_resyncs(redis_server, caplog):
    from pdserve.proxy.redis_index import RedisPrefixIndex

    async def go():
        index = RedisPrefixIndex(redis_server.url, retry_s=0.2)
        await index.apply("n1", KVEventBatch(ts=0.0, events=[_stored([1, 2])]))
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="pdserve.proxy.redis_index"):
            assert await index.match([1, 2]) == {"n1": 2}  # from the local view
            await index.apply(
                "n1", KVEventBatch(ts=0.0, events=[_stored([3]), BlockRemoved(block_hashes=[1])])
            )
            await index.drop_node("gone")
            assert await index.match([1, 2, 3]) == {} and await index.match([2, 3]) == {"n1": 2}  # local view
            assert not index.up and index.errors >= 1
        outage = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(outage) == 1  # logged once
        redis_server.start()
        await asyncio.sleep(0.3)
        assert await index.match([3]) == {"n1": 1}
        assert index.up
        assert await index.holders(1) == set() and await index.holders(3) == {"n1"}  # resynced
        await index.close()

    asyncio.run(go())


# ---------------------------------------------------------------------------------------------------- indexer


def _heartbeat(node_id, role="decode", rpc="tcp://127.0.0.1:1"):
    return msgpack.packb(
        {
            "node_id": node_id,
            "role": role,
            "rpc": rpc,
            "http": "http://127.0.0.1:2",
            "num_waiting": 1,
            "num_running": 2,
            "free_blocks": 90,
            "total_blocks": 100,
            "block_size": 4,
            "ts": time.time(),
        }
    )


def test_indexer_with_a_real_publisher():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    seq = {"n": 0}

    def send(topic, payload):
        seq["n"] += 1
        pub.send_multipart([topic, seq["n"].to_bytes(8, "big"), payload])

    async def go():
        import zmq.asyncio

        actx = zmq.asyncio.Context()
        registry = NodeRegistry(misses=3, interval_s=0.1)
        index = InProcessPrefixIndex()
        drops = []
        indexer = Indexer(actx, [f"tcp://127.0.0.1:{port}"], registry, index, on_drop=drops.append)
        indexer.start()
        await asyncio.sleep(0.3)  # slow joiner
        send(
            TOPIC_KV_EVENTS, encode_batch(KVEventBatch(ts=0.0, events=[_stored([1, 2])]))
        )  # before heartbeat
        send(TOPIC_KV_EVENTS, b"\xc1garbage")
        send(TOPIC_HEARTBEAT, _heartbeat("n1"))
        for _ in range(50):
            await asyncio.sleep(0.02)
            if index.num_blocks():
                break
        assert registry.nodes["n1"].alive and registry.nodes["n1"].num_running == 2
        assert await index.match([1, 2]) == {"n1": 2}  # held until the heartbeat named the node
        assert drops == ["kv_events"]
        # silence: dead after 3 x 0.1 s, entries dropped
        await asyncio.sleep(0.6)
        assert not registry.nodes["n1"].alive and await index.match([1, 2]) == {}
        # it speaks again: a new life, events apply at once
        send(TOPIC_HEARTBEAT, _heartbeat("n1"))
        send(TOPIC_KV_EVENTS, encode_batch(KVEventBatch(ts=0.0, events=[_stored([5])])))
        await asyncio.sleep(0.1)
        assert registry.nodes["n1"].alive and await index.match([5]) == {"n1": 1}
        # a sequence number going backwards: the node restarted with an empty cache
        pub.send_multipart(
            [
                TOPIC_KV_EVENTS,
                (0).to_bytes(8, "big"),
                encode_batch(KVEventBatch(ts=0.0, events=[_stored([9])])),
            ]
        )
        await asyncio.sleep(0.1)
        assert await index.match([5]) == {} and await index.match([9]) == {"n1": 1}
        await indexer.stop()
        actx.term()

    try:
        asyncio.run(go())
    finally:
        pub.close(0)
        ctx.term()


def test_heartbeat_validation():
    with pytest.raises(ValueError):
        decode_heartbeat(msgpack.packb({"node_id": "x"}))
    bad_role = msgpack.unpackb(_heartbeat("x"))
    bad_role["role"] = "wizard"
    with pytest.raises(ValueError):
        decode_heartbeat(msgpack.packb(bad_role))
    extra = msgpack.unpackb(_heartbeat("x"))
    extra["future_field"] = 1
    assert decode_heartbeat(msgpack.packb(extra)).node_id == "x"


# -------------------------------------------------------------------------------------------- through the app

PROMPT = list(range(100, 100 + 96))  # 6 blocks of 16


def _route(server, prompt=PROMPT):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["x-pdserve-route"]


@pytest.mark.parametrize("redis", [False, True])
def test_app_routes_to_the_holder(fake_nodes, proxy_factory, redis, request):
    p0, p1 = fake_nodes("p0", "prefill"), fake_nodes("p1", "prefill")
    d0, d1 = fake_nodes("d0", "decode"), fake_nodes("d1", "decode")
    kw = {}
    if redis:
        server_r = RedisServer(free_port()).start()
        request.addfinalizer(server_r.stop)
        kw["redis_url"] = server_r.url
    server = proxy_factory([p0, p1, d0, d1], **kw)
    server.wait_nodes(4)
    hashes = p1.store_prompt(PROMPT)
    wait_for(lambda: server.state.index.num_blocks() == len(hashes), 5, what="index fed")
    for _ in range(3):
        assert _route(server).startswith("disaggregated:p1->")
    # every request ended: this proxy's per-node prefill counters are back to zero
    nodes = server.state.registry.nodes.values()
    assert [(n.pending_prefill, n.pending_prefill_tokens) for n in nodes] == [(0, 0)] * 4
    if redis:
        assert {m.decode() for m in server_r.client().smembers(f"pdserve:block:{hashes[-1]}")} == {"p1"}
    # the decode node holding nearly all of it: colocated there
    d1.store_prompt(PROMPT)
    wait_for(lambda: _route(server) == "colocated:d1->d1", 5, what="colocated on the holder")


def test_app_round_robin_ignores_the_index(fake_nodes, proxy_factory):
    p0, p1 = fake_nodes("p0", "prefill"), fake_nodes("p1", "prefill")
    d0 = fake_nodes("d0", "decode")
    server = proxy_factory([p0, p1, d0], router={"policy": "round_robin"})
    server.wait_nodes(3)
    p1.store_prompt(PROMPT)
    time.sleep(0.3)
    routes = [_route(server) for _ in range(4)]
    assert sorted(routes) == sorted(["disaggregated:p0->d0", "disaggregated:p1->d0"] * 2)


def test_app_redis_down_keeps_serving(fake_nodes, proxy_factory, redis_server, caplog):
    p0, d0 = fake_nodes("p0", "prefill"), fake_nodes("d0", "decode")
    server = proxy_factory([p0, d0], redis_url=redis_server.url)
    server.wait_nodes(2)
    p0.store_prompt(PROMPT)
    wait_for(lambda: server.state.index.num_blocks() == 6, 5, what="index fed")
    assert "pdserve_proxy_redis_up 1.0" in httpx.get(server.url + "/metrics").text
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="pdserve.proxy.redis_index"):
        for _ in range(3):
            assert _route(server) == "disaggregated:p0->d0"  # still cache-aware, from the local view
    metrics = httpx.get(server.url + "/metrics").text
    assert "pdserve_proxy_redis_up 0.0" in metrics
    assert "pdserve_proxy_redis_errors_total" in metrics
    assert httpx.get(server.url + "/health").json()["redis"] == "down"
    assert sum("unavailable" in r.getMessage() for r in caplog.records) == 1
    gens = d0.messages(Generate)
    assert gens and all(g.prefill_rpc == p0.rpc for g in gens)


def test_a_node_back_from_silence_keeps_its_in_flight_counts():
    """In-flight requests hold the node's state object and decrement it when they end: reviving the node in
    place keeps those counts honest (a fresh object kept them forever and penalised the node in routing)."""
    from pdserve.proxy.nodes import NodeRegistry
    from pdserve.wire.node_messages import NodeHeartbeat

    registry = NodeRegistry(misses=3, interval_s=0.5)
    hb = NodeHeartbeat(
        node_id="d0",
        role="decode",
        rpc="tcp://127.0.0.1:1",
        http="http://127.0.0.1:2",
        num_waiting=0,
        num_running=0,
        free_blocks=10,
        total_blocks=10,
        block_size=16,
        ts=0.0,
    )
    node = registry.heartbeat("tcp://127.0.0.1:3", hb, now=0.0)
    node.active += 2  # two requests in flight hold `node`
    assert registry.reap(now=5.0) == [node] and not node.alive
    revived = registry.heartbeat("tcp://127.0.0.1:3", hb, now=5.1)
    assert revived is node and node.alive
    node.active -= 2  # both end
    assert registry.nodes["d0"].active == 0
