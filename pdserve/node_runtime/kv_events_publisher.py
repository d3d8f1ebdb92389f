"""--kv-events-config's publisher: a node's KV events on a ZMQ PUB socket of its own, in vLLM's format.

Each message is (topic, 8-byte big-endian sequence number, msgpack batch: `wire.kv_events`), as vLLM's
ZmqEventPublisher sends it, so llm-d's or Dynamo's indexer can subscribe to a pdserve node directly. The
sequence number rises by one per batch from 0; PUB drops a batch when a subscriber is slow or absent (the
high-water mark), and a subscriber that sees a gap treats this node's entries as stale. The node's own event
stream for pdserve proxies (on --events-port, beside heartbeats) is separate and unchanged.
"""

from __future__ import annotations

import threading

import zmq

from pdserve.wire.bind import warn_if_wildcard
from pdserve.wire.kv_events import KVEventBatch, encode_batch, event_frames


class KVEventPublisher:
    def __init__(self, endpoint: str, topic: bytes | str = b"kv-events", hwm: int = 100_000):
        warn_if_wildcard("KV event publisher", endpoint)
        self.topic = topic.encode() if isinstance(topic, str) else topic
        self._sock = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port when bound to :0
        self.seq = 0
        self.dropped = 0
        self._lock = threading.Lock()  # the RPC thread publishes, close() may come from another

    def publish(self, batch: KVEventBatch) -> int:
        """Send one batch; its sequence number, or -1 when the high-water mark made ZMQ drop it."""
        payload = encode_batch(batch)
        with self._lock:
            seq, self.seq = self.seq, self.seq + 1
            try:
                self._sock.send_multipart(event_frames(self.topic, seq, payload), flags=zmq.NOBLOCK)
            except zmq.Again:
                self.dropped += 1
                return -1
        return seq

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)
