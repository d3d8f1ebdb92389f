"""Node liveness as the proxy judges it: a proxy whose own event loop stalled does not declare healthy nodes
dead (their heartbeats were waiting unread), and a node declared dead mid-request is told to abort it."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from pdserve.proxy.nodes import NodeRegistry
from pdserve.wire.node_messages import Abort, Generate
from tests.harness.fake_node import Script
from tests.harness.servers import wait_for


def post_in_background(server, max_tokens: int, timeout: float) -> tuple[threading.Thread, dict]:
    """A completion sent from a thread (started); its response lands in the dict under "r"."""
    out: dict = {}
    body = {"prompt": "x", "max_tokens": max_tokens}
    t = threading.Thread(
        target=lambda: out.setdefault(
            "r", httpx.post(server.url + "/v1/completions", json=body, timeout=timeout)
        )
    )
    t.start()
    return t, out


def test_registry_counts_silence_only_while_listening():
    reg = NodeRegistry(misses=3, interval_s=0.5)
    reg.heartbeat("tcp://x:3", _hb(), now=100.0)
    reg.proxy_stalled(now=104.0)  # stalled from ~100 to 104: nothing heard, nothing judged
    assert reg.reap(now=105.0) == []
    assert [n.node_id for n in reg.reap(now=105.6)] == ["n"]


def test_a_reaper_tick_after_a_stall_judges_nobody():
    """The stall and the reaper's tick in one loop iteration (the issue: a long handler ran first, then the
    reaper, before any reader could take the heartbeats waiting in its socket): nobody is declared dead
    then."""
    import zmq.asyncio

    from pdserve.proxy.indexer import Indexer
    from pdserve.proxy.prefix_index import InProcessPrefixIndex

    async def main() -> bool:
        reg = NodeRegistry(misses=3, interval_s=0.1)
        reg.heartbeat("tcp://x:3", _hb(), now=time.monotonic())
        ctx = zmq.asyncio.Context()
        indexer = Indexer(ctx, [], reg, InProcessPrefixIndex())
        indexer.start()
        try:
            await asyncio.sleep(0.01)
            time.sleep(reg.timeout_s * 3)  # the loop is blocked; the reaper's tick comes due meanwhile
            await asyncio.sleep(reg.timeout_s / 6 + 0.02)  # the late tick has run
            return reg.nodes["n"].alive
        finally:
            await indexer.stop()
            ctx.term()

    assert asyncio.run(main())


def _hb():
    from pdserve.wire.node_messages import NodeHeartbeat

    return NodeHeartbeat(
        node_id="n",
        role="decode",
        rpc="tcp://x:1",
        http="http://x:2",
        num_waiting=0,
        num_running=0,
        free_blocks=1,
        total_blocks=1,
        block_size=16,
        ts=0.0,
    )


def test_node_declared_dead_mid_request_is_told_to_abort(fake_nodes, proxy_factory):
    d0 = fake_nodes("d0", "both")
    d0.script = Script(delay_s=0.05)
    server = proxy_factory([d0], request_timeout_s=30)
    server.wait_nodes(1)
    t, result = post_in_background(server, 200, 20)
    wait_for(lambda: d0.messages(Generate), 5, what="the request reaching the node")
    time.sleep(0.2)
    d0.beating = False
    d0.active.clear()  # silent, but alive enough to receive
    t.join(15)
    assert result["r"].status_code == 503
    rid = d0.messages(Generate)[0].request_id
    aborts = wait_for(lambda: [a for a in d0.messages(Abort) if a.request_id == rid], 5, what="abort")
    assert "declared dead" in aborts[0].reason


def test_a_stream_survives_a_stalled_proxy(fake_nodes, proxy_factory):
    """The loop stalled mid-stream: the stream still completes (no 503), since the node was never declared
    dead."""
    d0 = fake_nodes("d0", "both")
    d0.script = Script(delay_s=0.02)
    server = proxy_factory([d0])
    server.wait_nodes(1)
    timeout = server.state.registry.timeout_s
    t, out = post_in_background(server, 100, 30)
    wait_for(lambda: d0.messages(Generate), 5, what="the request reaching the node")

    async def stall():
        time.sleep(timeout * 2)

    server.call(stall, timeout=timeout * 4)
    t.join(20)
    assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["finish_reason"] == "length"
    assert server.state.registry.nodes["d0"].alive


def test_draining_node_is_routed_around_and_back_once_restarted(fake_nodes, proxy_factory):
    """A rolling restart as the proxy sees it. d1 refuses as draining before its heartbeat says so (the
    heartbeat is on the way): the proxy re-sends to d0 and the client gets 200. While d1's heartbeats say
    draining, nothing is sent there. When d1 beats again without draining (the restarted process on the same
    address and id), requests go there again."""
    d0, d1 = fake_nodes("d0", "both"), fake_nodes("d1", "both")
    server = proxy_factory([d0, d1], router={"policy": "round_robin"})
    server.wait_nodes(2)

    def complete(i: int) -> httpx.Response:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 3}, timeout=10)
        assert r.status_code == 200, r.text
        return r

    d1.script = Script(error=(503, "node d1 is draining", True), node_draining=True)
    refused = [complete(i) for i in range(4)]
    assert d1.messages(Generate), "round robin never tried d1"
    assert all("->d0" in r.headers["x-pdserve-route"] for r in refused)
    assert 'pdserve_proxy_retries_total{reason="node_error_503"}' in httpx.get(server.url + "/metrics").text

    d1.draining = True
    wait_for(lambda: server.state.registry.nodes["d1"].draining, 5, what="the proxy to see d1 draining")
    tried = len(d1.messages(Generate))
    assert all("->d0" in complete(i).headers["x-pdserve-route"] for i in range(4))
    assert len(d1.messages(Generate)) == tried

    d1.draining, d1.script = False, Script()
    wait_for(lambda: not server.state.registry.nodes["d1"].draining, 5, what="d1 back in the proxy")
    routes = [complete(i).headers["x-pdserve-route"] for i in range(4)]
    assert any("->d1" in r for r in routes), routes


def test_a_node_restarted_faster_than_the_reaper_hands_back_what_the_old_process_held(
    fake_nodes, proxy_factory
):
    """d1 is stopped while holding a request and a new process comes up on its address under its id before
    the proxy could miss a heartbeat. Its heartbeats name another process: the proxy declares the old d1 dead,
    so the request it held (no token yet) is re-sent and the client gets 200 instead of waiting out its
    timeout."""
    d0, d1 = fake_nodes("d0", "both"), fake_nodes("d1", "both")
    d0.draining = True  # everything goes to d1 first
    d1.script = Script(hang=True)
    server = proxy_factory([d0, d1], request_timeout_s=20, heartbeat_misses=1000)
    wait_for(lambda: server.state.registry.nodes.get("d0") and server.state.registry.nodes["d0"].draining, 5)
    server.wait_nodes(2)
    t, out = post_in_background(server, 3, 30)
    wait_for(lambda: d1.messages(Generate), 5, what="the request reaching d1")
    d0.draining = False
    wait_for(lambda: not server.state.registry.nodes["d0"].draining, 5, what="d0 routed to again")
    d1.stop()
    fake_nodes("d1", "both", ports=(d1.rpc_port, d1.events_port))
    t.join(15)
    assert not t.is_alive(), "the request held by the old d1 was never handed back"
    assert out["r"].status_code == 200, out["r"].text
    assert server.state.registry.nodes["d1"].alive
    assert 'pdserve_proxy_retries_total{reason="decode_node_lost"}' in httpx.get(server.url + "/metrics").text
