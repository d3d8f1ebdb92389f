"""The global prefix index: which nodes hold which KV blocks, built from the nodes' KV events.

Keys are the 64-bit block hashes of `wire.hashing.external_block_hash`, chained over the prompt, so a hash
stands for the whole prefix up to its block. `match(hashes)` answers, per node, how many *leading* blocks of a
prompt the node holds: that is what prefix caching can reuse (a later block held without its parents is
useless).

Two implementations share the `PrefixIndex` interface (all methods async so a networked one fits):
- `InProcessPrefixIndex` (here): dicts, the default.
- `RedisPrefixIndex` (proxy/redis_index.py): several proxies share one index; keeps this one as its fallback.
The index is a hint, never the truth: a stale entry costs a cache miss, not a wrong answer.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from pdserve.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch


class PrefixIndex(Protocol):
    async def apply(self, node_id: str, batch: KVEventBatch) -> None:
        """Apply one batch of a node's KV events."""

    async def drop_node(self, node_id: str) -> None:
        """Forget everything a node holds (it died, or restarted with an empty cache)."""

    async def match(self, block_hashes: list[int], node_ids: Iterable[str] | None = None) -> dict[str, int]:
        """node id -> number of leading blocks of `block_hashes` it holds (nodes with none are left out)."""

    def num_blocks(self) -> int:
        """Distinct blocks known (for metrics)."""

    async def close(self) -> None: ...


class InProcessPrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}  # block hash -> node ids
        self._by_node: dict[str, set[int]] = {}  # node id -> block hashes

    # ---- updates (sync: the Redis index calls them inline) -------------------------------------------------
    def add(self, node_id: str, hashes: Iterable[int]) -> None:
        mine = self._by_node.setdefault(node_id, set())
        for h in hashes:
            self._holders.setdefault(h, set()).add(node_id)
            mine.add(h)

    def remove(self, node_id: str, hashes: Iterable[int]) -> None:
        mine = self._by_node.get(node_id)
        for h in hashes:
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(node_id)
                if not holders:
                    del self._holders[h]
            if mine is not None:
                mine.discard(h)

    def clear_node(self, node_id: str) -> None:
        self.remove(node_id, list(self._by_node.pop(node_id, ())))

    def apply_sync(self, node_id: str, batch: KVEventBatch) -> None:
        for event in batch.events:
            if isinstance(event, BlockStored):
                self.add(node_id, event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self.remove(node_id, event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self.clear_node(node_id)

    def blocks_of(self, node_id: str) -> set[int]:
        return set(self._by_node.get(node_id, ()))

    def node_ids(self) -> list[str]:
        return list(self._by_node)

    def match_sync(self, block_hashes: list[int], node_ids: Iterable[str] | None = None) -> dict[str, int]:
        return leading_runs([self._holders.get(h, ()) for h in block_hashes], node_ids)

    # ---- PrefixIndex ---------------------------------------------------------------------------------------
    async def apply(self, node_id: str, batch: KVEventBatch) -> None:
        self.apply_sync(node_id, batch)

    async def drop_node(self, node_id: str) -> None:
        self.clear_node(node_id)

    async def match(self, block_hashes: list[int], node_ids: Iterable[str] | None = None) -> dict[str, int]:
        return self.match_sync(block_hashes, node_ids)

    def num_blocks(self) -> int:
        return len(self._holders)

    async def close(self) -> None:
        pass


def leading_runs(
    holders_per_block: list[Iterable[str]], node_ids: Iterable[str] | None = None
) -> dict[str, int]:
    """Given the holders of each block in prompt order, each node's count of consecutive blocks from the
    first."""
    if not holders_per_block:
        return {}
    active = set(holders_per_block[0])
    if node_ids is not None:
        active &= set(node_ids)
    runs: dict[str, int] = {}
    for i, holders in enumerate(holders_per_block):
        if not active:
            break
        holders = holders if isinstance(holders, (set, frozenset)) else set(holders)
        for node in active - holders:
            runs[node] = i
        active &= holders
    for node in active:
        runs[node] = len(holders_per_block)
    return {node: n for node, n in runs.items() if n > 0}
