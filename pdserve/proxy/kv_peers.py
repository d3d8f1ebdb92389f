"""Introduce decode nodes to prefill nodes as they come up, so KV links open before the first request.

A prefill node opens its KV link to a decode node the first time it must write there: a signed handshake and,
on cuda_ipc, mapping the decode node's cache (tens of ms on a GPU) land on that request's time to first token.
The proxy hears every node's heartbeat, decode nodes' KV listeners included, so whenever a node comes up (or
back) it tells each live prefill node the decode nodes' listeners it has not told it yet (`KVPeers`); the
prefill node connects in the background. Several proxies may tell the same thing: connecting is idempotent.
"""

from __future__ import annotations

import asyncio
import logging

from pdserve.proxy.node_rpc import NodeRpc
from pdserve.proxy.nodes import NodeRegistry, NodeState
from pdserve.wire.node_messages import KVPeers, NodeRole

log = logging.getLogger(__name__)


class KVPeerIntroducer:
    def __init__(self, registry: NodeRegistry, rpc: NodeRpc):
        self.registry, self.rpc = registry, rpc
        self.told: dict[str, set[str]] = {}  # prefill node id -> KV listeners it was told of
        registry.on_up.append(self.node_up)

    def node_up(self, node: NodeState) -> None:
        """Registry callback, on the proxy's event loop: a node came up, or back (its links may be gone)."""
        self.told.pop(node.node_id, None)
        self.introduce()

    def introduce(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a registry driven by hand): nothing can be sent
            return
        live = [n for n in self.registry.nodes.values() if n.alive]
        listeners = {n.node_id: n.kv for n in live if n.kv and NodeRole(n.role).decodes}
        for node in live:
            if not NodeRole(node.role).prefills:
                continue
            told = self.told.setdefault(node.node_id, set())
            new = sorted({kv for nid, kv in listeners.items() if nid != node.node_id} - told)
            if new:
                told.update(new)
                loop.create_task(self._tell(node, new))

    async def _tell(self, node: NodeState, endpoints: list[str]) -> None:
        try:
            await self.rpc.send(node.rpc, KVPeers(endpoints=endpoints))
        except Exception as exc:  # noqa: BLE001 - a node that cannot be told connects on its first request
            self.told.get(node.node_id, set()).difference_update(endpoints)
            log.info("could not tell %s of KV peers %s: %s", node.node_id, endpoints, exc)
