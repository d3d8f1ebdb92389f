"""KV cache events in vLLM's wire format (torch-free), so llm-d's or Dynamo's indexer could read ours.

A batch is an array `[ts, events, data_parallel_rank]`; each event is a map tagged by "type" (`BlockStored`,
`BlockRemoved`, `AllBlocksCleared`). Every field is written, None included: vLLM declares lora_id, medium and
lora_name without defaults, so its decoder rejects an event that leaves them out. (The defaults below only
spare our own callers from spelling them.) Block hashes are the 64-bit integers of
`wire.hashing.external_block_hash`. A BlockStored covers consecutive blocks of one prefix chain, so
`len(token_ids) == block_size * len(block_hashes)`.

On ZMQ PUB a batch travels as the multipart message `event_frames(topic, seq, payload)`: the topic, an 8-byte
big-endian sequence number (one per batch, from 0, per publisher) and `encode_batch`'s payload, as vLLM
publishes.
"""

from __future__ import annotations

from typing import Union

import msgspec


class KVCacheEvent(msgspec.Struct, tag_field="type", tag=True, forbid_unknown_fields=False):
    """Base of the tagged event maps."""


class BlockStored(KVCacheEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None


class BlockRemoved(KVCacheEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent, tag="AllBlocksCleared"):
    pass


AnyKVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[AnyKVEvent]
    data_parallel_rank: int | None = None


SEQ_BYTES = 8


def event_frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """One published message: (topic, 8-byte big-endian sequence number, payload), as vLLM publishes."""
    return [topic, seq.to_bytes(SEQ_BYTES, "big"), payload]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode and check one batch; raises msgspec.ValidationError / DecodeError on anything malformed."""
    batch = _decoder.decode(payload)
    for event in batch.events:
        if isinstance(event, BlockStored) and len(event.token_ids) != event.block_size * len(
            event.block_hashes
        ):
            raise msgspec.ValidationError(
                f"BlockStored carries {len(event.token_ids)} token ids for {len(event.block_hashes)} blocks "
                f"of {event.block_size}"
            )
    return batch
