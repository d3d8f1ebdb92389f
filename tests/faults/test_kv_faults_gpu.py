"""cuda_ipc faults with real processes on GPUs (one GPU shared, or two): a peer killed mid-write.

The producer writes into a mapping of the consumer's cache. A consumer that dies mid-write must not crash the
producer (stale mapping), which frees its blocks and serves a new consumer byte-exact; a producer that dies
mid-write leaves a consumer whose node forgets the request, frees the blocks, and takes a new producer's
writes.
"""

import time

import pytest

from tests.faults.test_kv_faults import (
    CFG,
    SLACK,
    TIMEOUT,
    assert_all_free,
    assert_fresh_peer_transfers,
    transfer,
    wait_for,
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.timeout(120)]


def devices():
    import torch

    return ("cuda:0", "cuda:1") if torch.cuda.device_count() > 1 else ("cuda:0", "cuda:0")


def open_pair(prod, cons, seed=1):
    cfg = dict(CFG, kv_connector="cuda_ipc")
    prod_dev, cons_dev = devices()
    address = cons.call("open", role="consumer", cfg=cfg, num_blocks=64, seed=seed, device=cons_dev)
    prod.call("open", role="producer", cfg=cfg, num_blocks=64, seed=seed + 1, device=prod_dev)
    return cfg, address


def test_consumer_killed_mid_write_leaves_the_producer_serving(pair):
    prod, cons = pair
    cfg, address = open_pair(prod, cons)
    transfer(prod, cons, "r", address, 200, 200, layer_delay=0.25, background=True)
    time.sleep(0.6)  # a couple of layers written
    cons.kill()
    state = wait_for(prod, lambda s: "r" in s["finished"], TIMEOUT + SLACK)
    assert_all_free(state, "r", ("peer_lost", "timeout"))
    time.sleep(
        0.6
    )  # the remaining layers' hooks run against a dropped mapping: no crash, nothing double-freed
    assert_all_free(prod.call("state"), "r", ("peer_lost", "timeout"))
    assert_fresh_peer_transfers(prod, "consumer", cfg, device=devices()[1], seed=5)


def test_producer_killed_mid_write_then_a_new_producer_writes_byte_exact(pair):
    prod, cons = pair
    cfg, address = open_pair(prod, cons)
    transfer(prod, cons, "r", address, 200, 200, layer_delay=0.25, background=True)
    time.sleep(0.6)
    prod.kill()
    cons.call("forget", rid="r")
    state = cons.call("state")
    assert state["held"] == {} and state["used"] == 0
    assert state["free"] + state["used"] + state["cached"] == state["total"]
    assert_fresh_peer_transfers(cons, "producer", cfg, address, device=devices()[0], seed=7)
