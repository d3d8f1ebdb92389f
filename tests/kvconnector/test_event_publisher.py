"""KV events over real ZMQ on loopback, decoded with structs that mirror vLLM's own (not ours)."""

import socket
import time
from typing import Any, Union

import msgspec
import zmq

from kvconnector.event_publisher import KVEventPublisher, KVEventSubscriber
from kvconnector.events import AllBlocksCleared, BlockRemoved, BlockStored


# vLLM's event structs as its indexers declare them: the batch an array, each event a map tagged by "type".
class VEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Union[int, None] = None


class VKVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class VBlockStored(VKVCacheEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: Union[int, None]
    token_ids: list[int]
    block_size: int
    lora_id: Union[int, None] = None
    medium: Union[str, None] = None
    lora_name: Union[str, None] = None


class VBlockRemoved(VKVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: Union[str, None] = None


class VAllBlocksCleared(VKVCacheEvent, tag="AllBlocksCleared"):
    pass


class VKVEventBatch(VEventBatch):
    events: list[Union[VBlockStored, VBlockRemoved, VAllBlocksCleared]]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_publish_subscribe_in_vllm_format():
    pub = KVEventPublisher(f"tcp://127.0.0.1:{free_port()}", topic="kv-events.node1", data_parallel_rank=0)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.SUB)
    raw.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    raw.connect(pub.endpoint)
    sub = KVEventSubscriber(pub.endpoint)
    try:
        bs = 4
        stored = BlockStored(
            block_hashes=[11, 12], parent_block_hash=None, token_ids=list(range(8)), block_size=bs
        )
        events = [stored, BlockRemoved(block_hashes=[12], medium="GPU"), AllBlocksCleared()]
        # PUB drops what it sends before a SUB has joined: heartbeat until both see one
        deadline = time.monotonic() + 10
        while not raw.poll(50) and time.monotonic() < deadline:
            pub.heartbeat()
        raw.recv_multipart()
        while sub.poll(0.05) is not None:
            pass
        seq = pub.publish(events, ts=123.5)
        topic, seq_bytes, payload = raw.recv_multipart()
        assert topic == b"kv-events.node1" and len(seq_bytes) == 8 and int.from_bytes(seq_bytes, "big") == seq
        batch = msgspec.msgpack.Decoder(VKVEventBatch).decode(payload)
        assert batch.ts == 123.5 and batch.data_parallel_rank == 0
        assert [type(e).__name__ for e in batch.events] == [
            "VBlockStored",
            "VBlockRemoved",
            "VAllBlocksCleared",
        ]
        for e in batch.events:
            if isinstance(e, VBlockStored):
                assert len(e.token_ids) == e.block_size * len(e.block_hashes)
        plain = msgspec.msgpack.decode(payload)
        assert (
            isinstance(plain, list)
            and plain[1][0]["type"] == "BlockStored"
            and plain[1][0]["lora_id"] is None
        )
        got = sub.poll(5)
        assert got is not None and got[0] == b"kv-events.node1" and got[1] == seq and got[2].events == events
        assert sub.missed == 0
    finally:
        raw.close(0)
        sub.close()
        pub.close()


def test_subscriber_drops_malformed_and_counts_gaps():
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    got = []
    sub = KVEventSubscriber(f"tcp://127.0.0.1:{port}", on_batch=lambda *a: got.append(a))
    try:
        ok = msgspec.msgpack.encode([1.0, []])
        bad_stored = msgspec.msgpack.encode(
            [
                1.0,
                [
                    {
                        "type": "BlockStored",
                        "block_hashes": [1],
                        "parent_block_hash": None,
                        "token_ids": [1, 2],
                        "block_size": 4,
                    }
                ],
            ]
        )
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            pub.send_multipart([b"kv-events", (0).to_bytes(8, "big"), ok])
            time.sleep(0.02)
        pub.send_multipart([b"kv-events", (1).to_bytes(8, "big"), b"\xc1garbage"])
        pub.send_multipart([b"kv-events", (2).to_bytes(8, "big"), bad_stored])
        pub.send_multipart([b"kv-events", b"short", ok])
        pub.send_multipart([b"kv-events", (9).to_bytes(8, "big"), ok])
        deadline = time.monotonic() + 5
        while (not got or got[-1][1] != 9) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got[-1][1] == 9
        assert sub.dropped == {"garbage": 2, "schema": 1}
        assert sub.missed == 8
    finally:
        sub.close()
        pub.close(0)


class VBlockStoredStrict(VKVCacheEvent, tag="BlockStored"):
    """As vLLM declares it: lora_id, medium and lora_name have no defaults, so they are always on the wire."""

    block_hashes: list[int]
    parent_block_hash: Union[int, None]
    token_ids: list[int]
    block_size: int
    lora_id: Union[int, None]
    medium: Union[str, None]
    lora_name: Union[str, None]


class VStrictBatch(VEventBatch):
    events: list[Union[VBlockStoredStrict, VBlockRemoved, VAllBlocksCleared]]


def test_vllm_strict_decoder_reads_block_stored():
    from kvconnector.events import KVEventBatch, encode_batch

    payload = encode_batch(
        KVEventBatch(
            ts=1.0,
            events=[BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1, 2], block_size=2)],
        )
    )
    msgspec.msgpack.Decoder(VStrictBatch).decode(payload)
