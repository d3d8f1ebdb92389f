"""What the proxy knows about each node: its heartbeats (role, endpoints, load) and whether it is alive.

A node is alive from its first heartbeat until it has been silent for `misses` heartbeat intervals (any rpc
message from it counts as a sign of life too, so a node too busy to publish on time is not declared dead while
it streams tokens). A dead node is never routed to; listeners (the indexer, the dispatcher) drop its index
entries and fail or re-route its requests. A dead node that speaks again comes back as a new node; so does a
node whose heartbeat names another process (`incarnation`: it restarted before it was missed), after it is
declared dead first, since the new process holds none of the old one's requests. Silence only counts while
the proxy was listening: after its own event loop stalled (the reaper woke late), every node gets a fresh
timeout, since its heartbeats may be waiting unread in the socket.

The proxy also counts its own requests per node (`pending_prefill`, `active`): heartbeats are up to an
interval old, and without these a burst would all go to the node that looked idle half a second ago.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from pdserve.wire.node_messages import HEARTBEAT_INTERVAL_S, NodeHeartbeat, NodeRole

log = logging.getLogger(__name__)

PREFILL_ROLES = tuple(r.value for r in NodeRole if r.prefills)
DECODE_ROLES = tuple(r.value for r in NodeRole if r.decodes)


@dataclass(eq=False)
class NodeState:
    node_id: str
    events: str  # the events endpoint we subscribed to
    role: str
    rpc: str
    http: str
    block_size: int
    num_waiting: int = 0
    num_running: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    alive: bool = True
    draining: bool = False  # shutting down: alive (its requests finish) but never routed to
    kv: str = ""  # its KV listener (host:port) when it receives KV
    incarnation: str = ""  # the node process's random id (heartbeats); another one: it restarted
    pending_prefill: int = 0  # this proxy's requests prefilling here (no first token yet)
    pending_prefill_tokens: int = 0  # ...and the prompt tokens they compute here (uncached when routed)
    active: int = 0  # this proxy's requests decoding here (or colocated)

    @property
    def can_prefill(self) -> bool:
        return self.role in PREFILL_ROLES

    @property
    def can_decode(self) -> bool:
        return self.role in DECODE_ROLES

    @property
    def prefill_queue(self) -> int:
        return max(self.num_waiting, self.pending_prefill)

    @property
    def decode_load(self) -> int:
        return max(self.num_waiting + self.num_running, self.active)

    @property
    def free_fraction(self) -> float:
        return self.free_blocks / self.total_blocks if self.total_blocks else 0.0

    def describe(self) -> dict:
        return {
            "node_id": self.node_id,
            "role": self.role,
            "rpc": self.rpc,
            "http": self.http,
            "events": self.events,
            "alive": self.alive,
            "draining": self.draining,
            "num_waiting": self.num_waiting,
            "num_running": self.num_running,
            "free_blocks": self.free_blocks,
            "total_blocks": self.total_blocks,
            "block_size": self.block_size,
            "proxy_pending_prefill": self.pending_prefill,
            "proxy_pending_prefill_tokens": self.pending_prefill_tokens,
            "proxy_active": self.active,
            "silent_s": round(time.monotonic() - self.last_seen, 3),
        }


class NodeRegistry:
    def __init__(self, misses: int = 3, interval_s: float = HEARTBEAT_INTERVAL_S):
        self.timeout_s = misses * interval_s
        self.listening_since = 0.0  # monotonic; see proxy_stalled
        self.nodes: dict[str, NodeState] = {}
        self._by_rpc: dict[str, NodeState] = {}
        self.on_dead: list[Callable[[NodeState], None]] = []
        self.on_up: list[Callable[[NodeState], None]] = []

    def heartbeat(self, events_endpoint: str, hb: NodeHeartbeat, now: Optional[float] = None) -> NodeState:
        now = time.monotonic() if now is None else now
        node = self.nodes.get(hb.node_id)
        if node is not None and node.alive and node.incarnation and hb.incarnation != node.incarnation:
            # Restarted quicker than the reaper could notice: what the old process held is gone with it.
            self.kill(node, "restarted (a new process under its id)")
        came_up = node is None or not node.alive
        if came_up:
            # Revive in place: requests still in flight hold this object and decrement its counters when they
            # end; a fresh object would keep their counts forever.
            if node is None:
                node = NodeState(hb.node_id, events_endpoint, hb.role, hb.rpc, hb.http, hb.block_size)
                self.nodes[hb.node_id] = node
            node.alive = True
            log.info(
                "node %s up: role %s, rpc %s, http %s, events %s",
                hb.node_id,
                hb.role,
                hb.rpc,
                hb.http,
                events_endpoint,
            )
        node.role, node.rpc, node.http, node.block_size = hb.role, hb.rpc, hb.http, hb.block_size
        node.kv = hb.kv
        node.incarnation = hb.incarnation
        node.events = events_endpoint
        node.num_waiting, node.num_running = hb.num_waiting, hb.num_running
        node.free_blocks, node.total_blocks = hb.free_blocks, hb.total_blocks
        if hb.draining and not node.draining:
            log.info("node %s is draining: no longer routed to", node.node_id)
        node.draining = hb.draining
        node.last_seen = now
        self._by_rpc[node.rpc] = node
        if came_up:  # after the fields above: the callbacks read this heartbeat's endpoints
            for cb in self.on_up:
                cb(node)
        return node

    def touch(self, node_id: str, now: Optional[float] = None) -> None:
        node = self.nodes.get(node_id)
        if node is not None and node.alive:
            node.last_seen = time.monotonic() if now is None else now

    def by_rpc(self, rpc: str) -> Optional[NodeState]:
        return self._by_rpc.get(rpc)

    def proxy_stalled(self, now: Optional[float] = None) -> None:
        """This proxy could not listen for a while (its event loop was busy): heartbeats may sit unread in its
        sockets, so silence is counted again from now, not from before the stall."""
        self.listening_since = time.monotonic() if now is None else now

    def reap(self, now: Optional[float] = None) -> list[NodeState]:
        """Declare nodes silent for longer than the timeout dead; returns the newly dead."""
        now = time.monotonic() if now is None else now
        dead = [
            n
            for n in self.nodes.values()
            if n.alive and now - max(n.last_seen, self.listening_since) > self.timeout_s
        ]
        for node in dead:
            self.kill(node, f"silent for {now - node.last_seen:.2f}s")
        return dead

    def kill(self, node: NodeState, why: str) -> None:
        if not node.alive:
            return
        node.alive = False
        log.warning(
            "node %s (%s, rpc %s) is dead: %s; no longer routed to, its index entries dropped",
            node.node_id,
            node.role,
            node.rpc,
            why,
        )
        for cb in self.on_dead:
            cb(node)

    def live(self) -> list[NodeState]:
        return [n for n in self.nodes.values() if n.alive]

    def prefillers(self) -> list[NodeState]:
        """Nodes to route prefills to: live and not draining."""
        return [n for n in self.live() if n.can_prefill and not n.draining]

    def decoders(self) -> list[NodeState]:
        """Nodes to route requests to: live and not draining."""
        return [n for n in self.live() if n.can_decode and not n.draining]

    def block_size(self) -> Optional[int]:
        sizes = {n.block_size for n in self.live()}
        if len(sizes) > 1:
            log.warning("live nodes disagree on block_size (%s); using the smallest", sorted(sizes))
        return min(sizes) if sizes else None
