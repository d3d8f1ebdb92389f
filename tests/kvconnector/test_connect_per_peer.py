"""A decode node that never answers its KV handshake holds up only the connects bound for it: while one
thread waits on such a peer, another connects to a live consumer and gets its link (the producer's connect
lock is per address, not one for all peers)."""

import socket
import threading

import torch

from pdserve.kvconnector.connector import ConnectorConfig
from pdserve.kvconnector.consumer import KVConsumer
from pdserve.kvconnector.producer import KVProducer

LAYOUT = dict(model="m", dtype="float32", block_size=16, num_layers=2, num_kv_heads=2, head_dim=8)


def test_a_silent_peer_does_not_block_connects_to_others():
    cfg = ConnectorConfig(kv_connector="tcp", secret="s", timeout=20.0, **LAYOUT)
    cache = lambda: torch.zeros(2, 2, 8, 16, 2, 8)  # noqa: E731 - [layers, K/V, blocks, block, heads, dim]
    producer, consumer = KVProducer(cfg, cache()), KVConsumer(cfg, cache())
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    stuck = threading.Thread(target=lambda: _try_connect(producer, silent.getsockname()), daemon=True)
    try:
        stuck.start()
        stuck.join(0.5)
        assert stuck.is_alive(), "the silent peer's handshake should still be pending"
        link = producer.connect(tuple(consumer.address))
        assert link.peer is not None and not link.closed
        assert stuck.is_alive(), "the live peer's connect waited for the silent one"
    finally:
        silent.close()
        producer.close()
        consumer.close()


def _try_connect(producer, address):
    try:
        producer.connect(address)
    except Exception:  # noqa: BLE001 - the silent peer times out or closes; either is fine here
        pass
