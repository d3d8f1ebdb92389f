"""Subscribes to every node's events socket: heartbeats keep the node registry, KV events keep the prefix
index.

One SUB socket per `--node` endpoint, because a vLLM-format KV event batch does not name its node: the
endpoint it arrived on does, once that endpoint's first heartbeat has told us the node id (batches before that
are held, at most `MAX_PENDING`). A sequence number that goes backwards means the node restarted with an empty
cache, so its entries are dropped. Malformed messages are counted by reason, logged once per endpoint and
reason, and dropped.

A reaper declares nodes dead after `misses` silent heartbeat intervals (of time the proxy was listening: a
tick that comes late means the loop stalled, and silence restarts from then); the registry's listeners then
drop their index entries (here) and fail or re-route their requests (the dispatcher).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq
import zmq.asyncio

from pdserve.proxy.nodes import NodeRegistry, NodeState
from pdserve.proxy.prefix_index import PrefixIndex
from pdserve.wire import curve
from pdserve.wire.kv_events import decode_batch
from pdserve.wire.node_messages import TOPIC_HEARTBEAT, TOPIC_KV_EVENTS, decode_heartbeat

log = logging.getLogger(__name__)

MAX_PENDING = 256
STALL_FRACTION = 0.25  # a reaper tick this late (in node timeouts) means the proxy itself was not listening


class Indexer:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoints: list[str],
        registry: NodeRegistry,
        index: PrefixIndex,
        on_drop: Callable[[str], None] = lambda reason: None,
        secret: bytes = b"",
    ):
        self.ctx = ctx
        self.endpoints = list(endpoints)
        self.registry = registry
        self.index = index
        self.on_drop = on_drop
        self.secret = secret  # CURVE keys when $PDSERVE_CURVE=1
        self._node_of: dict[str, str] = {}  # endpoint -> node id
        self._pending: dict[str, list] = {}  # endpoint -> batches before the first heartbeat
        self._last_seq: dict[tuple[str, bytes], int] = {}
        self._logged: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task] = []
        self._sockets: list[zmq.asyncio.Socket] = []
        self._drops: list[str] = []  # node ids whose entries must be dropped (from sync callbacks)
        self._drop_event = asyncio.Event()
        registry.on_dead.append(self._node_dead)

    def start(self) -> None:
        for endpoint in self.endpoints:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            curve.client(sock, self.secret)
            sock.setsockopt(zmq.SUBSCRIBE, TOPIC_KV_EVENTS)
            sock.setsockopt(zmq.SUBSCRIBE, TOPIC_HEARTBEAT)
            sock.connect(endpoint)
            self._sockets.append(sock)
            self._tasks.append(asyncio.create_task(self._read(endpoint, sock), name=f"indexer {endpoint}"))
        self._tasks.append(asyncio.create_task(self._reaper(), name="indexer reaper"))
        self._tasks.append(asyncio.create_task(self._dropper(), name="indexer dropper"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._sockets:
            sock.close(linger=0)

    # ---- reading -------------------------------------------------------------------------------------------
    async def _read(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            parts = await sock.recv_multipart()
            try:
                await self._handle(endpoint, parts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad message never stops the reader
                self._dropped(endpoint, "garbage", f"{type(exc).__name__}: {exc}")

    async def _handle(self, endpoint: str, parts: list[bytes]) -> None:
        if len(parts) < 2:
            return self._dropped(endpoint, "truncated", f"{len(parts)} part(s)")
        topic, payload = parts[0], parts[-1]
        if len(parts) >= 3 and len(parts[1]) == 8 and self._restarted(endpoint, topic, parts[1]):
            await self._drop(self._node_of[endpoint])
        if topic == TOPIC_HEARTBEAT:
            try:
                hb = decode_heartbeat(payload)
            except ValueError as exc:
                return self._dropped(endpoint, "heartbeat", str(exc))
            previous = self._node_of.get(endpoint)
            if previous is not None and previous != hb.node_id:
                await self._drop(previous)  # another node now answers on this endpoint
            self._node_of[endpoint] = hb.node_id
            self.registry.heartbeat(endpoint, hb)
            for batch in self._pending.pop(endpoint, []):
                await self.index.apply(hb.node_id, batch)
        elif topic.startswith(TOPIC_KV_EVENTS):  # b"kv-events" or b"kv-events.<node>"
            try:
                batch = decode_batch(payload)
            except Exception as exc:  # noqa: BLE001 - msgspec raises several kinds
                return self._dropped(endpoint, "kv_events", str(exc))
            node_id = self._node_of.get(endpoint)
            node = self.registry.nodes.get(node_id) if node_id else None
            if node is None or not node.alive:
                pending = self._pending.setdefault(endpoint, [])
                if len(pending) < MAX_PENDING:
                    pending.append(batch)
                return
            await self.index.apply(node_id, batch)

    def _restarted(self, endpoint: str, topic: bytes, seq_bytes: bytes) -> bool:
        """A KV-event sequence number going backwards: the node restarted and its cache is empty."""
        seq = int.from_bytes(seq_bytes, "big")
        key = (endpoint, topic)
        last = self._last_seq.get(key)
        self._last_seq[key] = seq
        if (
            last is None
            or seq >= last
            or not topic.startswith(TOPIC_KV_EVENTS)
            or endpoint not in self._node_of
        ):
            return False
        log.warning(
            "KV events from %s restarted at seq %d (was %d): the node restarted; dropping its index entries",
            endpoint,
            seq,
            last,
        )
        return True

    def _dropped(self, endpoint: str, reason: str, detail: str) -> None:
        self.on_drop(reason)
        if (endpoint, reason) not in self._logged:
            self._logged.add((endpoint, reason))
            log.warning("dropped a malformed %s message from %s: %s (logged once)", reason, endpoint, detail)

    # ---- liveness ------------------------------------------------------------------------------------------
    def _node_dead(self, node: NodeState) -> None:
        self._drops.append(node.node_id)
        self._drop_event.set()

    async def _drop(self, node_id: str) -> None:
        await self.index.drop_node(node_id)

    async def _dropper(self) -> None:
        while True:
            await self._drop_event.wait()
            self._drop_event.clear()
            while self._drops:
                await self._drop(self._drops.pop(0))

    async def _reaper(self) -> None:
        interval = max(self.registry.timeout_s / 6, 0.05)
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(interval)
            late = loop.time() - asked - interval
            if late > STALL_FRACTION * self.registry.timeout_s:
                # The loop was too busy to read heartbeats either: judge nobody on silence we could not hear.
                log.warning("proxy event loop stalled for %.2fs; node silence is counted from now", late)
                self.registry.proxy_stalled()
                continue
            self.registry.reap()
