"""Physical KV blocks: reference counts, the prefix cache (hash -> block), LRU eviction, and KV events.

Torch-free: a block here is only an id into the paged KV cache tensors that the model runner owns.

Every block is in exactly one of three states, so `num_free + num_used + num_cached == num_blocks` always:
  used     ref_count > 0 (held by one request, or shared by several through prefix hits)
  cached   ref_count == 0 and holds a hash: still a prefix hit until evicted
  free     ref_count == 0 and no hash: holds nothing worth keeping

Allocation takes free blocks before it evicts cached ones (a free block holds nothing anyone could hit), then
evicts cached blocks least recently freed first. `free()` releases a request's blocks in REVERSE order, so the
tail of a prefix chain is queued for eviction before its head: a hit needs the chain from block 0, so the head
blocks serve every request sharing any part of the prefix and should live longest.

One hash maps to one block; the first block registered under a hash wins. A duplicate (two requests computed
the same prefix in the same step) stays unhashed and returns to the free state when released.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from pdserve.wire.hashing import BlockHash, external_block_hash
from pdserve.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent


class NoFreeBlocksError(RuntimeError):
    """allocate() was asked for more blocks than are free or evictable; callers check num_available first."""


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups counted in tokens, once per request admission (retries of a blocked admission and
    recomputes after preemption are not counted, so the rate reflects what clients' prompts found)."""

    requests: int = 0
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def record(self, queried_tokens: int, hit_tokens: int) -> None:
        self.requests += 1
        self.queried_tokens += queried_tokens
        self.hit_tokens += hit_tokens


class BlockPool:
    def __init__(
        self, num_blocks: int, enable_caching: bool = True, block_size: int = 16, emit_events: bool = False
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.emit_events = emit_events
        self.blocks = [Block(i) for i in range(num_blocks)]
        # OrderedDicts give O(1) removal from the middle (a hit on a cached block) and FIFO order at the head.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: OrderedDict[int, Block] = OrderedDict()  # head = next to evict
        self._by_hash: dict[BlockHash, Block] = {}
        self._events: list[KVCacheEvent] = []
        self.stats = PrefixCacheStats()

    # ---- counters ------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    @property
    def num_available(self) -> int:
        """Blocks allocate() can hand out now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    # ---- allocation ----------------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block]:
        """n blocks with ref_count 1, free ones first, then evicting the least recently freed cached ones."""
        if n > self.num_available:
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {self.num_available} available")
        out: list[Block] = []
        evicted: list[int] = []
        for _ in range(n):
            if self._free:
                block = self._free.popitem(last=False)[1]
            else:
                block = self._cached.popitem(last=False)[1]
                evicted.append(external_block_hash(self._drop_hash(block)))
            block.ref_count = 1
            out.append(block)
        if evicted and self.emit_events:
            self._events.append(BlockRemoved(block_hashes=evicted))
        return out

    def touch(self, blocks: Sequence[Block]) -> None:
        """Take one more reference on each block (prefix hits); a released block leaves its queue."""
        for block in blocks:
            if block.ref_count == 0:
                queue = self._cached if block.block_hash is not None else self._free
                del queue[block.block_id]
            block.ref_count += 1

    def free(self, blocks: Sequence[Block]) -> None:
        """Drop one reference on each; blocks reaching zero join the tail of their queue, last block first."""
        for block in reversed(blocks):
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} freed more often than it was taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                queue = self._cached if block.block_hash is not None else self._free
                queue[block.block_id] = block

    # ---- prefix cache --------------------------------------------------------------------------------------
    def get_cached_block(self, block_hash: BlockHash) -> Block | None:
        if not self.enable_caching:
            return None
        return self._by_hash.get(block_hash)

    def cache_full_blocks(
        self,
        block_hashes: Sequence[BlockHash],
        blocks: Sequence[Block],
        num_cached_blocks: int,
        num_full_blocks: int,
        token_ids: Sequence[int],
    ) -> None:
        """Register blocks[num_cached_blocks:num_full_blocks] under block_hashes at the same indices.

        blocks is one request's block table and token_ids its tokens, so block i holds
        token_ids[i*block_size:(i+1)*block_size]. Blocks that already hold a hash (prefix hits) and hashes
        that another block already holds are skipped; each run of newly stored consecutive blocks is one
        BlockStored.
        """
        if not self.enable_caching:
            return
        run_start = -1
        for i in range(num_cached_blocks, num_full_blocks):
            block, block_hash = blocks[i], block_hashes[i]
            stored = block.block_hash is None and block_hash not in self._by_hash
            if stored:
                block.block_hash = block_hash
                self._by_hash[block_hash] = block
                run_start = i if run_start < 0 else run_start
            elif run_start >= 0:
                self._emit_stored(block_hashes, run_start, i, token_ids)
                run_start = -1
        if run_start >= 0:
            self._emit_stored(block_hashes, run_start, num_full_blocks, token_ids)

    def reset_prefix_cache(self) -> bool:
        """Forget every hash (used blocks keep their data but stop being hits); cached blocks become free."""
        for block in self._by_hash.values():
            block.block_hash = None
        self._by_hash.clear()
        self._free.update(self._cached)
        self._cached.clear()
        if self.emit_events:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVCacheEvent]:
        """Events since the last call, oldest first; the caller publishes them."""
        events, self._events = self._events, []
        return events

    def _drop_hash(self, block: Block) -> BlockHash:
        block_hash = block.block_hash
        del self._by_hash[block_hash]
        block.block_hash = None
        return block_hash

    def _emit_stored(
        self, block_hashes: Sequence[BlockHash], start: int, end: int, token_ids: Sequence[int]
    ) -> None:
        if not self.emit_events:
            return
        size = self.block_size
        self._events.append(
            BlockStored(
                block_hashes=[external_block_hash(h) for h in block_hashes[start:end]],
                parent_block_hash=external_block_hash(block_hashes[start - 1]) if start > 0 else None,
                token_ids=list(token_ids[start * size : end * size]),
                block_size=size,
            )
        )

    # ---- checking ------------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError on any accounting inconsistency (explicit raises: they survive `python
        -O`)."""

        def fail(msg: str) -> None:
            raise AssertionError(f"BlockPool: {msg}")

        if self.num_free + self.num_used + self.num_cached != self.num_blocks:
            fail("free + used + cached != total")
        for block in self.blocks:
            in_free, in_cached = block.block_id in self._free, block.block_id in self._cached
            if block.ref_count < 0:
                fail(f"block {block.block_id} has ref_count {block.ref_count}")
            if (block.ref_count == 0) != (in_free or in_cached) or (in_free and in_cached):
                fail(f"block {block.block_id} (ref {block.ref_count}) queued wrongly")
            if in_free and block.block_hash is not None or in_cached and block.block_hash is None:
                fail(f"block {block.block_id} is in the wrong queue for its hash")
            if block.block_hash is not None and self._by_hash.get(block.block_hash) is not block:
                fail(f"block {block.block_id}'s hash does not map back to it")
        if sum(b.block_hash is not None for b in self.blocks) != len(self._by_hash):
            fail("hash map holds blocks that do not hold its hashes")
