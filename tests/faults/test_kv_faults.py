"""KV transfer faults with real processes: a peer killed or frozen mid-transfer, malformed frames.

The producer frees a request's blocks within --kv-timeout (plus slack) of losing its consumer and notifies
completion exactly once. The consumer keeps no deadline of its own (its node gives up and `forget`s the
request); what it must guarantee is that nothing lands in blocks it has forgotten. Block accounting holds on
both sides (free + used + cached == total) and both keep serving.
"""

import os
import signal
import socket
import time

import pytest

from tests.harness.bad_frames import bad_frame, stranger_hello

TIMEOUT = 2.0
SLACK = 1.5
CFG = dict(
    model="tiny",
    dtype="bfloat16",
    block_size=16,
    num_layers=8,
    num_kv_heads=2,
    head_dim=16,
    secret="test-secret",
    timeout=TIMEOUT,
)

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


def transfer(prod, cons, rid, address, num_tokens, chunk_tokens, **kw):
    res = cons.call("reserve", rid=rid, num_tokens=num_tokens)
    out = prod.call(
        "transfer", rid=rid, address=address, num_tokens=num_tokens, chunk_tokens=chunk_tokens, **res, **kw
    )
    if (
        not kw.get("background") and "error" not in out
    ):  # the producer is done at its fence; wait for the Done
        assert cons.call("wait_finished", rid=rid) is not None, f"{rid}: the consumer never completed"
    return out


def assert_fresh_peer_transfers(
    other, fresh_role: str, cfg: dict, address=None, device: str = "cpu", seed: int = 3
):
    """A new process as producer (writing into other's address) or consumer (written by other) moves a
    200-token request byte-exact: the survivor of a fault keeps serving."""
    from tests.harness.kv_pair import NodeHandle

    fresh = NodeHandle()
    try:
        opened = fresh.call("open", role=fresh_role, cfg=cfg, num_blocks=64, seed=seed, device=device)
        prod, cons = (fresh, other) if fresh_role == "producer" else (other, fresh)
        out = transfer(prod, cons, "s", address if fresh_role == "producer" else opened, 200, 64)
        assert "error" not in out, out
        assert prod.call("block_bytes", block_ids=out["local"]) == cons.call(
            "block_bytes", block_ids=out["remote"]
        )
    finally:
        fresh.close()


def start_slow_transfer(prod, cons, transport):
    cfg = dict(CFG, kv_connector=transport)
    address = cons.call("open", role="consumer", cfg=cfg, num_blocks=64, seed=1)
    prod.call("open", role="producer", cfg=cfg, num_blocks=64, seed=2)
    # 8 layers x 0.25 s per layer: the transfer is under way for 2 s
    transfer(prod, cons, "r", address, 200, 200, layer_delay=0.25, background=True)
    time.sleep(0.6)  # a couple of layers have landed
    return address


def test_consumer_killed_mid_transfer(pair):
    prod, cons = pair
    start_slow_transfer(prod, cons, "tcp")
    assert cons.call("state")["finished"] == {}
    cons.kill()
    t0 = time.monotonic()
    state = wait_for(prod, lambda s: "r" in s["finished"], TIMEOUT + SLACK)
    assert time.monotonic() - t0 <= TIMEOUT + SLACK
    assert_all_free(state, "r", ("peer_lost", "timeout"))
    time.sleep(0.6)  # later layers of the dead request must not resurrect or double-free anything
    assert_all_free(prod.call("state"), "r", ("peer_lost", "timeout"))


def test_producer_killed_mid_transfer(pair):
    """The node gives up on the request and forgets it: its blocks are free again and the consumer keeps
    serving (a new producer transfers into the same blocks, byte-exact)."""
    prod, cons = pair
    address = start_slow_transfer(prod, cons, "tcp")
    prod.kill()
    cons.call("forget", rid="r")
    state = cons.call("state")
    assert state["held"] == {} and state["active"] == [] and state["finished"] == {}
    assert state["used"] == 0 and state["free"] + state["used"] + state["cached"] == state["total"]
    assert_fresh_peer_transfers(cons, "producer", dict(CFG, kv_connector="tcp"), address)


def test_late_writes_of_a_frozen_producer_never_land_in_forgotten_blocks(pair):
    """SIGSTOP mid-transfer; the node gives up (forget) and hands the same blocks to another request; when the
    producer wakes up and finishes, nothing it writes for the forgotten request lands."""
    prod, cons = pair
    start_slow_transfer(prod, cons, "tcp")
    os.kill(prod.proc.pid, signal.SIGSTOP)
    try:
        cons.call("forget", rid="r")
        res = cons.call("reserve", rid="s", num_tokens=64 * 16)  # every block, those r was given among them
        before = cons.call("block_bytes", block_ids=res["remote"])
    finally:
        os.kill(prod.proc.pid, signal.SIGCONT)
    wait_for(prod, lambda s: "r" in s["finished"], TIMEOUT + SLACK)
    time.sleep(0.3)
    assert cons.call("block_bytes", block_ids=res["remote"]) == before
    state = cons.call("state")
    assert "r" not in state["finished"] and state["used"] == len(res["remote"])
    assert state["free"] + state["used"] + state["cached"] == state["total"]


def send_raw(address, data: bytes) -> None:
    with socket.create_connection(tuple(address), timeout=5) as s:
        s.sendall(data)
        time.sleep(0.05)


def test_malformed_frames_are_dropped_and_node_keeps_serving(pair):
    prod, cons = pair
    cfg = dict(CFG, kv_connector="tcp", num_layers=2)
    address = cons.call("open", role="consumer", cfg=cfg, num_blocks=64, seed=1)
    prod.call("open", role="producer", cfg=cfg, num_blocks=64, seed=2)
    # 1. strangers on fresh connections (a hello, which needs no secret, then a bad frame): each is refused
    # and its connection closed. Only garbage and a wrong frame version are named as such: any frame not
    # signed with the session's key fails its prefix MAC before its lengths or header are looked at.
    send_raw(address, bad_frame("garbage"))  # not even a hello
    for kind in ("version", "oversized", "truncated", "hmac", "schema"):
        send_raw(address, stranger_hello() + bad_frame(kind))
    # 2. the real producer's live link: frames signed outside the session close it; the producer reconnects
    out = transfer(prod, cons, "good0", address, 40, 40)
    assert "error" not in out
    for kind in ("hmac", "schema", "schema_version", "hmac"):
        assert prod.call("inject", address=address, kind=kind), kind
    out = transfer(prod, cons, "good1", address, 70, 32)
    assert "error" not in out, out
    assert prod.call("block_bytes", block_ids=out["local"]) == cons.call(
        "block_bytes", block_ids=out["remote"]
    )
    want = {"garbage": 1, "version": 1, "oversized": 0, "truncated": 0, "hmac": 8, "schema": 0}
    state = wait_for(cons, lambda s: s["drops"] == want, 5)
    assert state["drops"] == want
    for rid in ("good0", "good1"):
        assert state["finished"][rid] == {"ok": True, "cause": "", "calls": 1}
    assert state["used"] == 3 + 5 and state["free"] + state["used"] + state["cached"] == state["total"]
    assert prod.call("state")["used"] == 0
