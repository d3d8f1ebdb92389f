"""Chained block hashes shared by the proxy's index and the engine's prefix cache (torch-free).

h_i = sha256(msgpack([h_{i-1}, token ids of block i, extra keys])). The first parent is a fixed seed, so the
same tokens hash the same in every process and on every machine (Python's hash() is salted per process).
A hash covers the whole prefix up to and including its block, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import msgpack

HASH_ALGORITHM = "sha256-msgpack-v1"
ROOT_PARENT_HASH: bytes = hashlib.sha256(b"pdserve/block-hash/v1").digest()

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: Iterable = ()) -> BlockHash:
    """Hash one full block given its parent's hash (None for the first block)."""
    payload = msgpack.packb(
        [parent if parent is not None else ROOT_PARENT_HASH, list(token_ids), list(extra_keys)],
        use_bin_type=True,
    )
    return hashlib.sha256(payload).digest()


def hash_prompt_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Iterable = (),
    parent: BlockHash | None = None,
    cache_salt: str | None = None,
) -> list[BlockHash]:
    """Chained hashes of every full block of token_ids; a trailing partial block gets none.

    cache_salt joins the first block's extra keys (only when parent is None: the first block of the chain), so
    two salts share no hash while one salt still shares its whole prefix chain."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    extra = list(extra_keys)
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        keys = extra + [cache_salt] if cache_salt and parent is None else extra
        parent = hash_block(parent, token_ids[start : start + block_size], keys)
        hashes.append(parent)
    return hashes


def external_block_hash(block_hash: BlockHash) -> int:
    """The 64-bit integer form that KV events and the global index carry (first 8 bytes, big-endian)."""
    return int.from_bytes(block_hash[:8], "big")
