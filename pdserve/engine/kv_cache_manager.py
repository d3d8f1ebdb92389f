"""Which KV blocks each request holds; the scheduler talks tokens to this and never touches a Block.

Torch-free. A request's block table covers its computed tokens plus those scheduled this step; block i holds
the request's tokens [i*block_size, (i+1)*block_size). The same calls serve a request whose KV is computed
here and one whose KV arrives from another node (allocate slots for its tokens, then cache_blocks once they
have landed).

Sliding windows (wire/sliding_window.py): when every layer slides, blocks that left the window are released
after each step and their table entries become None (the kernels never read them; `block_table` shows them as
block 0), so a long sequence holds about window / block_size blocks.
"""

from __future__ import annotations

from typing import Sequence

from pdserve.engine.block_pool import Block, BlockPool
from pdserve.engine.request import Request
from pdserve.wire.sliding_window import first_window_block

DEAD_BLOCK_ID = 0  # what a released entry shows in block_table: never read, so any valid id will do


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, block_pool: BlockPool, block_size: int, max_model_len: int, free_window: int = 0
    ) -> None:
        """free_window: release blocks every layer's window has left (0: never; see the module docstring)."""
        if block_pool.block_size != block_size:
            raise ValueError(f"block pool has block_size {block_pool.block_size}, manager {block_size}")
        self.pool = block_pool
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.free_window = free_window
        self._blocks: dict[str, list[Block | None]] = {}  # request_id -> block table (None: released)
        self._num_hashed: dict[
            str, int
        ] = {}  # request_id -> leading blocks already offered to the prefix cache
        self._num_released: dict[str, int] = {}  # request_id -> leading blocks released out of the window
        self._no_caching: set[str] = set()  # requests whose blocks are never offered to the prefix cache

    # ---- capacity ------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation could take now (free plus evictable cached)."""
        return self.pool.num_available

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- prefix hits ---------------------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """The longest run of cached full blocks at the start of the request, and the tokens they cover.

        Never all of the request's tokens: the last token must be computed to produce logits, so at most
        (num_tokens - 1) // block_size blocks can hit. Takes no references; pass the blocks to allocate_slots.
        """
        if not self.pool.enable_caching:
            return [], 0
        if request.block_size is None:  # used without the scheduler (e.g. a decode node's reservation)
            request.set_block_size(self.block_size)
        max_hits = min(len(request.block_hashes), (request.num_tokens - 1) // self.block_size)
        hits: list[Block] = []
        for block_hash in request.block_hashes[:max_hits]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Count one admission's lookup in the pool's hit-rate stats (the scheduler calls it once per
        request)."""
        self.pool.stats.record(request.num_tokens, num_hit_tokens)

    # ---- slots ---------------------------------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[Block] = ()
    ) -> bool:
        """Make the block table cover request.num_computed_tokens + hits + num_new_tokens tokens.

        new_computed_blocks are prefix hits from get_computed_blocks (only for a request holding no blocks
        yet); they are appended first. Returns False, taking nothing, when the blocks do not fit.
        """
        table = self._blocks.get(request.request_id, [])
        if new_computed_blocks and table:
            raise ValueError(f"request {request.request_id} already holds blocks; prefix hits come first")
        num_hit_tokens = len(new_computed_blocks) * self.block_size
        total = request.num_computed_tokens + num_hit_tokens + num_new_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"request {request.request_id} would hold {total} tokens > max_model_len {self.max_model_len}"
            )
        num_new_blocks = max(0, cdiv(total, self.block_size) - len(table) - len(new_computed_blocks))
        # Hits sitting in the cached queue stop being allocatable once touched, so they count against
        # capacity.
        num_revived = sum(1 for b in new_computed_blocks if b.ref_count == 0)
        if num_new_blocks + num_revived > self.pool.num_available:
            return False
        # 1. take the hits first, so the allocation below cannot evict them
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
        # 2. then fresh blocks for the rest
        table = self._blocks.setdefault(request.request_id, table)
        table.extend(new_computed_blocks)
        if num_new_blocks:
            table.extend(self.pool.allocate(num_new_blocks))
        self._num_hashed.setdefault(request.request_id, len(new_computed_blocks))
        return True

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Offer the request's blocks that are now full of computed tokens to the prefix cache."""
        table = self._blocks.get(request.request_id)
        if table is None or request.request_id in self._no_caching:
            return
        if request.block_size is None:
            request.set_block_size(self.block_size)
        num_full = min(num_computed_tokens // self.block_size, len(request.block_hashes), len(table))
        # a block released before it was hashed cannot be cached any more
        num_done = max(
            self._num_hashed.get(request.request_id, 0), self._num_released.get(request.request_id, 0)
        )
        if num_full <= num_done:
            return
        self.pool.cache_full_blocks(request.block_hashes, table, num_done, num_full, request.all_token_ids)
        self._num_hashed[request.request_id] = num_full

    def skip_caching(self, request_id: str) -> None:
        """Never offer this request's blocks to the prefix cache (some of its layers' KV was not shipped)."""
        self._no_caching.add(request_id)

    def release_out_of_window(self, request: Request) -> None:
        """After a step (and after cache_blocks): give back the blocks no layer's window reaches any more."""
        if not self.free_window:
            return
        table = self._blocks.get(request.request_id)
        if not table:
            return
        rid = request.request_id
        start = self._num_released.get(rid, 0)
        end = min(
            first_window_block(request.num_computed_tokens, self.free_window, self.block_size), len(table)
        )
        if end <= start:
            return
        dead = [b for b in table[start:end] if b is not None]
        table[start:end] = [None] * (end - start)
        self._num_released[rid] = end
        if dead:
            self.pool.free(dead)

    def free(self, request: Request | str) -> None:
        """Release every block the request holds (cached ones stay hits until evicted). Idempotent."""
        request_id = request if isinstance(request, str) else request.request_id
        table = self._blocks.pop(request_id, None)
        self._num_hashed.pop(request_id, None)
        self._num_released.pop(request_id, None)
        self._no_caching.discard(request_id)
        held = [b for b in table or () if b is not None]
        if held:
            self.pool.free(held)

    # ---- views ---------------------------------------------------------------------------------------------
    def block_table(self, request: Request | str) -> list[int]:
        """The request's block ids in token order (a fresh list)."""
        request_id = request if isinstance(request, str) else request.request_id
        return [DEAD_BLOCK_ID if b is None else b.block_id for b in self._blocks.get(request_id, ())]

    def num_blocks_held(self, request: Request | str) -> int:
        """Entries in the request's block table (released ones included: positions keep their index)."""
        request_id = request if isinstance(request, str) else request.request_id
        return len(self._blocks.get(request_id, ()))

    def take_events(self) -> list:
        return self.pool.take_events()

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
