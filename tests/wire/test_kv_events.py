"""KV events as a node publishes them, decoded with structs that mirror vLLM's own (not ours)."""

from typing import Any, Union

import msgspec

from pdserve.wire.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    decode_batch,
    encode_batch,
    event_frames,
)


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


def test_published_batch_in_vllm_format():
    """What a node's PUB socket sends (node_runtime/rpc_server.py), decoded with vLLM's structs."""
    bs = 4
    stored = BlockStored(
        block_hashes=[11, 12], parent_block_hash=None, token_ids=list(range(8)), block_size=bs
    )
    events = [stored, BlockRemoved(block_hashes=[12], medium="GPU"), AllBlocksCleared()]
    frames = event_frames(
        b"kv-events.node1", 7, encode_batch(KVEventBatch(ts=123.5, events=events, data_parallel_rank=0))
    )
    topic, seq_bytes, payload = frames
    assert topic == b"kv-events.node1" and len(seq_bytes) == 8 and int.from_bytes(seq_bytes, "big") == 7
    batch = msgspec.msgpack.Decoder(VKVEventBatch).decode(payload)
    assert batch.ts == 123.5 and batch.data_parallel_rank == 0
    assert [type(e).__name__ for e in batch.events] == ["VBlockStored", "VBlockRemoved", "VAllBlocksCleared"]
    for e in batch.events:
        if isinstance(e, VBlockStored):
            assert len(e.token_ids) == e.block_size * len(e.block_hashes)
    plain = msgspec.msgpack.decode(payload)
    assert isinstance(plain, list) and plain[1][0]["type"] == "BlockStored" and plain[1][0]["lora_id"] is None
    assert decode_batch(payload).events == events


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
    payload = encode_batch(
        KVEventBatch(
            ts=1.0,
            events=[BlockStored(block_hashes=[1], parent_block_hash=None, token_ids=[1, 2], block_size=2)],
        )
    )
    msgspec.msgpack.Decoder(VStrictBatch).decode(payload)
