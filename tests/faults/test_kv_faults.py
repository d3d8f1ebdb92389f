"""KV transfer faults with real processes: a peer killed or frozen mid-transfer, malformed frames.

Each test checks that the surviving node frees the request's blocks within --kv-timeout (plus slack), notifies
completion exactly once, keeps serving, and that its block accounting holds (free + used + cached == total).
"""
import os
import signal
import socket
import time

import pytest

from tests.kvconnector.bad_frames import bad_frame, stranger_hello
from tests.kvconnector.node_proc import pair  # noqa: F401 (a fixture)

TIMEOUT = 2.0
SLACK = 1.5
CFG = dict(model="tiny", dtype="bfloat16", block_size=16, num_layers=8, num_kv_heads=2, head_dim=16,
           secret="test-secret", timeout=TIMEOUT)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def wait_for(node, pred, limit):
    deadline = time.monotonic() + limit
    while True:
        state = node.call("state")
        if pred(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def assert_all_free(state, rid, cause):
    assert state["finished"].get(rid, {}).get("calls") == 1, state["finished"]
    assert state["finished"][rid]["ok"] is False
    assert state["finished"][rid]["cause"] in cause, state["finished"][rid]
    assert state["free_calls"].get(rid) == 1
    assert state["active"] == [] and state["held"] == {}
    assert state["used"] == 0 and state["free"] + state["used"] + state["cached"] == state["total"]


def start_slow_transfer(prod, cons, transport):
    cfg = dict(CFG, kv_connector=transport)
    address = cons.call("open", role="consumer", cfg=cfg, num_blocks=64, seed=1)
    prod.call("open", role="producer", cfg=cfg, num_blocks=64, seed=2)
    # 8 layers x 0.25 s per layer: the transfer is under way for 2 s
    prod.call("transfer", rid="r", address=address, num_tokens=200, chunk_tokens=200, layer_delay=0.25,
              background=True)
    wait_for(cons, lambda s: s["held"].get("r"), 10)
    time.sleep(0.6)  # a couple of layers have landed
    return address


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_consumer_killed_mid_transfer(pair, transport):
    prod, cons = pair
    start_slow_transfer(prod, cons, transport)
    assert cons.call("state")["finished"] == {}
    cons.kill()
    t0 = time.monotonic()
    state = wait_for(prod, lambda s: "r" in s["finished"], TIMEOUT + SLACK)
    assert time.monotonic() - t0 <= TIMEOUT + SLACK
    assert_all_free(state, "r", ("peer_lost", "timeout"))
    time.sleep(0.6)  # later layers of the dead request must not resurrect or double-free anything
    assert_all_free(prod.call("state"), "r", ("peer_lost", "timeout"))


@pytest.mark.parametrize("transport", ["tcp", "ucx"])
def test_producer_killed_mid_transfer(pair, transport):
    prod, cons = pair
    start_slow_transfer(prod, cons, transport)
    prod.kill()
    t0 = time.monotonic()
    state = wait_for(cons, lambda s: "r" in s["finished"], TIMEOUT + SLACK)
    assert time.monotonic() - t0 <= TIMEOUT + SLACK
    assert_all_free(state, "r", ("peer_lost", "timeout"))


def test_producer_frozen_times_out(pair):
    """SIGSTOP: the connection stays open but nothing arrives; the inactivity timeout frees the reservation."""
    prod, cons = pair
    start_slow_transfer(prod, cons, "tcp")
    os.kill(prod.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        state = wait_for(cons, lambda s: "r" in s["finished"], TIMEOUT + SLACK)
        assert time.monotonic() - t0 <= TIMEOUT + SLACK
        assert_all_free(state, "r", ("timeout", "peer_lost"))
    finally:
        os.kill(prod.proc.pid, signal.SIGCONT)
    # the producer wakes up, learns the request is gone, and frees its side too
    state = wait_for(prod, lambda s: "r" in s["finished"], TIMEOUT + SLACK)
    assert_all_free(state, "r", ("timeout", "peer_lost", "remote_abort"))


def send_raw(address, data: bytes) -> None:
    with socket.create_connection(tuple(address), timeout=5) as s:
        s.sendall(data)
        time.sleep(0.05)


def test_malformed_frames_are_dropped_and_node_keeps_serving(pair):
    prod, cons = pair
    cfg = dict(CFG, kv_connector="tcp", num_layers=2)
    address = cons.call("open", role="consumer", cfg=cfg, num_blocks=64, seed=1)
    prod.call("open", role="producer", cfg=cfg, num_blocks=64, seed=2)
    # 1. strangers on fresh connections (a hello, which needs no secret, then a bad frame): each is refused and
    # its connection closed. Only garbage and a wrong frame version are named as such: any frame not signed with
    # the session's key fails its prefix MAC before its lengths or header are looked at.
    send_raw(address, bad_frame("garbage"))  # not even a hello
    for kind in ("version", "oversized", "truncated", "hmac", "schema"):
        send_raw(address, stranger_hello() + bad_frame(kind))
    # 2. the real producer's live link: frames signed outside the session close it; the producer reconnects
    out = prod.call("transfer", rid="good0", address=address, num_tokens=40, chunk_tokens=40)
    assert "error" not in out
    for kind in ("hmac", "schema", "schema_version", "hmac"):
        assert prod.call("inject", address=address, kind=kind), kind
    out = prod.call("transfer", rid="good1", address=address, num_tokens=70, chunk_tokens=32)
    assert "error" not in out, out
    assert prod.call("block_bytes", block_ids=out["local"]) == cons.call("block_bytes", block_ids=out["remote"])
    want = {"garbage": 1, "version": 1, "oversized": 0, "truncated": 0, "hmac": 8, "schema": 0}
    state = wait_for(cons, lambda s: s["drops"] == want, 5)
    assert state["drops"] == want
    for rid in ("good0", "good1"):
        assert state["finished"][rid] == {"ok": True, "cause": "", "calls": 1}
    assert state["used"] == 3 + 5 and state["free"] + state["used"] + state["cached"] == state["total"]
    assert prod.call("state")["used"] == 0
