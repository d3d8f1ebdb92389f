"""The global prefix index in Redis, so that several proxies share one view (same interface as PrefixIndex).

Layout (prefix default "pdserve"):
    {prefix}:block:{hash}    SET of node ids holding that block (hash = the 64-bit external hash, in decimal)
    {prefix}:node:{node_id}  SET of block hashes the node holds (to drop a node in one sweep)
Every proxy applies the events it receives (set operations, so several proxies writing the same events agree).

Redis is an optimisation, never a dependency: every event is also applied to an in-process index, and when
Redis fails (refused, timeout) the proxy answers from that local view, logs the outage once, sets
`pdserve_proxy_redis_up` to 0 and retries every `retry_s`. When Redis is back, the local view of each node is
written again (blocks stored or removed while it was down, nodes that died meanwhile), then Redis serves
again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterable

from pdserve.proxy.prefix_index import InProcessPrefixIndex, leading_runs
from pdserve.wire.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

log = logging.getLogger(__name__)


class RedisPrefixIndex:
    def __init__(self, url: str, prefix: str = "pdserve", retry_s: float = 1.0, timeout_s: float = 0.5):
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self.retry_s = retry_s
        self.local = InProcessPrefixIndex()
        self._redis = aioredis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self.up = True  # optimistic until the first failure
        self.errors = 0  # failed Redis operations (a metric)
        self._retry_at = 0.0
        self._dirty = False  # the local view holds changes Redis missed
        self._dropped_while_down: set[str] = set()
        self._resync_lock = asyncio.Lock()

    def _block_key(self, h: int) -> str:
        return f"{self.prefix}:block:{h}"

    def _node_key(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    # ---- health --------------------------------------------------------------------------------------------
    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        self._dirty = True
        self._retry_at = time.monotonic() + self.retry_s
        if self.up:
            self.up = False
            log.warning(
                "Redis index at %s is unavailable (%s: %s); serving from the in-process view and "
                "retrying every %.1fs",
                self.url,
                type(exc).__name__,
                exc,
                self.retry_s,
            )

    async def _usable(self) -> bool:
        """True when Redis may be used now; after an outage, resync first."""
        if self.up and not self._dirty:
            return True
        if not self.up and time.monotonic() < self._retry_at:
            return False
        async with self._resync_lock:
            if self.up and not self._dirty:
                return True
            try:
                await self._resync()
            except Exception as exc:  # noqa: BLE001 - any client error means "down"
                self._failed(exc)
                return False
            self._dirty = False
            if not self.up:
                self.up = True
                log.warning(
                    "Redis index at %s is reachable again; resynced %d nodes",
                    self.url,
                    len(self.local.node_ids()),
                )
            return True

    async def _resync(self) -> None:
        for node_id in list(self._dropped_while_down):
            await self._drop_in_redis(node_id)
            self._dropped_while_down.discard(node_id)
        for node_id in self.local.node_ids():
            now = self.local.blocks_of(node_id)
            before = {int(h) for h in await self._redis.smembers(self._node_key(node_id))}
            await self._write(node_id, stored=now - before, removed=before - now)

    async def _write(self, node_id: str, stored: Iterable[int], removed: Iterable[int]) -> None:
        stored, removed = list(stored), list(removed)
        if not stored and not removed:
            return
        pipe = self._redis.pipeline(transaction=False)
        for h in stored:
            pipe.sadd(self._block_key(h), node_id)
        for h in removed:
            pipe.srem(self._block_key(h), node_id)
        if stored:
            pipe.sadd(self._node_key(node_id), *stored)
        if removed:
            pipe.srem(self._node_key(node_id), *removed)
        await pipe.execute()

    async def _drop_in_redis(self, node_id: str) -> None:
        held = await self._redis.smembers(self._node_key(node_id))
        pipe = self._redis.pipeline(transaction=False)
        for h in held:
            pipe.srem(self._block_key(int(h)), node_id)
        pipe.delete(self._node_key(node_id))
        await pipe.execute()

    # ---- PrefixIndex ---------------------------------------------------------------------------------------
    async def apply(self, node_id: str, batch: KVEventBatch) -> None:
        cleared = any(isinstance(e, AllBlocksCleared) for e in batch.events)
        held_before = self.local.blocks_of(node_id) if cleared else set()
        self.local.apply_sync(node_id, batch)
        if not await self._usable():
            return
        try:
            for event in batch.events:
                if isinstance(event, BlockStored):
                    await self._write(node_id, stored=event.block_hashes, removed=())
                elif isinstance(event, BlockRemoved):
                    await self._write(node_id, stored=(), removed=event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    await self._write(node_id, stored=(), removed=held_before)
                    await self._drop_in_redis(node_id)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    async def drop_node(self, node_id: str) -> None:
        self.local.clear_node(node_id)
        if not await self._usable():
            self._dropped_while_down.add(node_id)
            return
        try:
            await self._drop_in_redis(node_id)
        except Exception as exc:  # noqa: BLE001
            self._dropped_while_down.add(node_id)
            self._failed(exc)

    async def match(self, block_hashes: list[int], node_ids: Iterable[str] | None = None) -> dict[str, int]:
        if not block_hashes:
            return {}
        if await self._usable():
            try:
                pipe = self._redis.pipeline(transaction=False)
                for h in block_hashes:
                    pipe.smembers(self._block_key(h))
                members = await pipe.execute()
                holders = [{m.decode() if isinstance(m, bytes) else m for m in s} for s in members]
                return leading_runs(holders, node_ids)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
        return self.local.match_sync(block_hashes, node_ids)

    def num_blocks(self) -> int:
        return self.local.num_blocks()

    async def holders(self, block_hash: int) -> set[str]:
        """Nodes Redis lists for one block (tests and debugging)."""
        return {m.decode() for m in await self._redis.smembers(self._block_key(block_hash))}

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except Exception:  # noqa: BLE001
            pass
