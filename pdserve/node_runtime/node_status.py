"""What a node says about itself: its heartbeat, /health, the engine state behind vLLM's gauges, its extra
gauges, and its KV events (to proxies on the events socket, and to --kv-events-config's publisher)."""

from __future__ import annotations

import os
import time

from pdserve.wire.kv_events import KVEventBatch, encode_batch
from pdserve.wire.node_messages import (
    TOPIC_HEARTBEAT,
    TOPIC_KV_EVENTS,
    NodeHeartbeat,
    NodeRole,
    encode_heartbeat,
)
from pdserve.wire.vllm_metrics import EngineState

INCARNATION = os.urandom(8).hex()  # this process's, in every heartbeat: a proxy tells a restart by it


class NodeStatus:
    """Reads a NodeServer (`node`) at call time; its methods are the callbacks the server wires up."""

    def __init__(self, node):
        self.node = node

    def publish_kv_events(self, outputs) -> None:
        events = self.node.core.block_pool.take_events()
        if events:
            batch = KVEventBatch(ts=time.time(), events=events)
            self.node.rpc.publish(TOPIC_KV_EVENTS, encode_batch(batch))
            if self.node.kv_events_pub is not None:
                self.node.kv_events_pub.publish(batch)

    def heartbeat(self) -> None:
        s = self.node.loop.snapshot
        self.node.rpc.publish(
            TOPIC_HEARTBEAT,
            encode_heartbeat(
                NodeHeartbeat(
                    node_id=self.node.node_id,
                    role=NodeRole.of_kv_role(self.node.role).value,
                    rpc=self.node.rpc_endpoint,
                    http=self.node.http_url,
                    num_waiting=s.num_waiting + s.num_waiting_remote,  # vllm:num_requests_waiting's meaning
                    num_running=s.num_running,
                    free_blocks=s.num_free_blocks + s.num_cached_blocks,
                    total_blocks=s.num_total_blocks,
                    block_size=s.block_size,
                    ts=time.time(),
                    draining=self.node.draining or bool(self.node.loop.broken),  # proxies stop routing here
                    kv=self.node.decode.kv_endpoint if self.node.decode is not None else "",
                    incarnation=INCARNATION,
                )
            ),
        )

    def extra_gauges(self) -> dict:
        gauges = {}
        if self.node.decode is not None:
            gauges["pdserve_node_requests_pending_kv"] = (
                "decode: reserved, waiting for KV",
                self.node.decode.num_pending,
            )
        if self.node.prefill is not None:
            gauges["pdserve_node_requests_prefilling"] = (
                "prefill: prefilling or transferring",
                self.node.prefill.num_active,
            )
        return gauges

    def snapshot_now(self):
        """Loop thread: a fresh snapshot (the loop takes one after each turn; this one is taken now)."""
        self.node.loop._take_snapshot()
        return self.node.loop.snapshot

    def engine_state(self) -> EngineState:
        s, base = self.node.loop.snapshot, self.node._baseline
        # vllm:num_requests_waiting counts, as vLLM's scheduler does, requests in WAITING_FOR_REMOTE_KVS: on a
        # decode node they hold reserved blocks and wait for a prefill node's KV, which is queueing for the
        # operator (an autoscaler on this gauge must see a decode node whose requests wait on transfers).
        return EngineState(
            running=s.num_running,
            waiting=s.num_waiting + s.num_waiting_remote,
            kv_cache_usage=s.num_used_blocks / s.num_total_blocks if s.num_total_blocks else 0.0,
            prefix_queries=s.prefix_queried_tokens - (base.prefix_queried_tokens if base else 0),
            prefix_hits=s.prefix_hit_tokens - (base.prefix_hit_tokens if base else 0),
            preemptions=s.num_preemptions - (base.num_preemptions if base else 0),
        )

    def health(self) -> tuple[bool, dict]:
        s = self.node.loop.snapshot
        alive = self.node.loop.alive and self.node.rpc._thread.is_alive() and not self.node.loop.broken
        ok = alive and not self.node.draining
        body = {"error": self.node.loop.broken} if self.node.loop.broken else {}
        return ok, {
            **body,
            "status": "ok" if ok else ("draining" if alive else "unhealthy"),
            "node_id": self.node.node_id,
            "role": NodeRole.of_kv_role(self.node.role).value,
            "rpc": self.node.rpc_endpoint,
            "num_waiting": s.num_waiting,
            "num_running": s.num_running,
            "num_free_blocks": s.num_free_blocks,
            "num_used_blocks": s.num_used_blocks,
            "num_cached_blocks": s.num_cached_blocks,
            "num_total_blocks": s.num_total_blocks,
        }
