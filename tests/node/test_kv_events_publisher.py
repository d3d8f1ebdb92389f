"""--kv-events-config's publisher: a plain ZMQ SUB socket receives (topic, sequence number, batch), the
sequence rising by one per batch, and the batch decodes to what was published."""

import time

import zmq

from pdserve.node_runtime.kv_events_publisher import KVEventPublisher
from pdserve.wire.kv_events import BlockRemoved, BlockStored, KVEventBatch, decode_batch


def test_published_batches_arrive_in_order_with_their_sequence_numbers():
    pub = KVEventPublisher("tcp://127.0.0.1:0", topic="kv-events.node-7", hwm=1000)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(pub.endpoint)
    try:
        stored = BlockStored(
            block_hashes=[11, 12],
            parent_block_hash=None,
            token_ids=list(range(32)),
            block_size=16,
            lora_id=None,
        )
        batch = KVEventBatch(ts=1.5, events=[stored, BlockRemoved(block_hashes=[3])])
        deadline = time.monotonic() + 10
        while not sub.poll(50):  # PUB drops what it sends before the subscription reached it
            assert time.monotonic() < deadline, "nothing arrived"
            pub.publish(KVEventBatch(ts=0.0, events=[]))
        while sub.poll(50):  # drain the probes
            sub.recv_multipart()
        first = pub.publish(batch)
        second = pub.publish(batch)
        assert second == first + 1
        for want in (first, second):
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"kv-events.node-7" and int.from_bytes(seq, "big") == want
            got = decode_batch(payload)
            assert got.ts == 1.5 and got.events == batch.events
    finally:
        sub.close(linger=0)
        pub.close()
