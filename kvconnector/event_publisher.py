"""KV events over ZMQ PUB/SUB (torch-free): multipart (topic, 8-byte big-endian sequence number, payload).

The payload is `kvconnector.events.encode_batch`'s msgpack (vLLM's format), so llm-d's or Dynamo's indexer can
subscribe to a node directly. The sequence number increases by one per batch from 0; a subscriber that sees a
gap counts the missed batches (PUB drops when a subscriber is slow or joins late: the indexer treats a gap or a
missed heartbeat as "this node's entries are stale"). An empty batch is the heartbeat.

Publisher: `KVEventPublisher("tcp://127.0.0.1:5557", topic=f"kv-events.{engine_id}").publish(events)`; sockets
bind to the address given. Give each node its own topic (the default prefix plus its id): a SUB socket cannot
tell publishers apart otherwise, and sequence numbers are per publisher.
Subscriber (the proxy's indexer): `KVEventSubscriber(endpoints, on_batch=fn)` subscribes to the topic prefix and
runs a thread calling `fn(topic, seq, batch)`; or call `poll(timeout)` yourself. Malformed messages are dropped, counted and logged
once per reason.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterable, Optional, Sequence

import msgspec
import zmq

from kvconnector.bind import warn_if_wildcard
from kvconnector.events import AnyKVEvent, KVEventBatch, decode_batch, encode_batch

log = logging.getLogger(__name__)

DEFAULT_TOPIC = b"kv-events"
SEQ_BYTES = 8


def event_frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """One published message: (topic, 8-byte big-endian sequence number, payload), as vLLM publishes."""
    return [topic, seq.to_bytes(SEQ_BYTES, "big"), payload]


class KVEventPublisher:
    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5557",
        topic: bytes | str = DEFAULT_TOPIC,
        data_parallel_rank: Optional[int] = None,
        hwm: int = 100_000,
        context: Optional[zmq.Context] = None,
    ):
        warn_if_wildcard("KV event publisher", endpoint)
        self.topic = topic.encode() if isinstance(topic, str) else topic
        self.dp_rank = data_parallel_rank
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port when bound to :0
        self.seq = 0
        self.dropped = 0
        self._lock = threading.Lock()  # zmq sockets are not thread-safe

    def publish(self, events: Iterable[AnyKVEvent] | KVEventBatch, ts: Optional[float] = None) -> int:
        """Send one batch; returns its sequence number (or -1 when the HWM made ZMQ drop it)."""
        batch = (
            events
            if isinstance(events, KVEventBatch)
            else KVEventBatch(
                ts=time.time() if ts is None else ts, events=list(events), data_parallel_rank=self.dp_rank
            )
        )
        payload = encode_batch(batch)
        with self._lock:
            seq = self.seq
            self.seq += 1
            try:
                self._sock.send_multipart(
                    event_frames(self.topic, seq, payload), flags=zmq.NOBLOCK, copy=False
                )
            except zmq.Again:
                self.dropped += 1
                return -1
        return seq

    def heartbeat(self) -> int:
        return self.publish([])

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)


class KVEventSubscriber:
    """SUB to one or more nodes' publishers; decodes and checks every batch."""

    def __init__(
        self,
        endpoints: Sequence[str] | str,
        topic: bytes | str = DEFAULT_TOPIC,
        on_batch: Optional[Callable[[bytes, int, KVEventBatch], None]] = None,
        context: Optional[zmq.Context] = None,
    ):
        self.topic = topic.encode() if isinstance(topic, str) else topic
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, self.topic)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.endpoints: list[str] = []
        for ep in [endpoints] if isinstance(endpoints, str) else endpoints:
            self.connect(ep)
        self.on_batch = on_batch
        self.last_seq: dict[bytes, int] = {}  # per topic, i.e. per publishing node
        self.missed = 0
        self.dropped: dict[str, int] = {}
        self._logged: set[str] = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if on_batch is not None:
            self._thread = threading.Thread(target=self._loop, name="kv-event-sub", daemon=True)
            self._thread.start()

    def connect(self, endpoint: str) -> None:
        self._sock.connect(endpoint)
        self.endpoints.append(endpoint)

    def poll(self, timeout: float = 1.0) -> Optional[tuple[bytes, int, KVEventBatch]]:
        """(topic, seq, batch) of one checked batch, or None on timeout or a dropped (malformed) message."""
        if not self._sock.poll(int(timeout * 1000)):
            return None
        frames = self._sock.recv_multipart()
        try:
            topic, seq_bytes, payload = frames
            if len(seq_bytes) != SEQ_BYTES:
                raise ValueError(f"sequence number of {len(seq_bytes)} bytes")
            seq = int.from_bytes(seq_bytes, "big")
            batch = decode_batch(payload)
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._drop("schema" if isinstance(exc, msgspec.ValidationError) else "garbage", exc)
            return None
        last = self.last_seq.get(topic)
        if last is not None and seq > last + 1:
            self.missed += seq - last - 1
        elif last is not None and seq <= last:  # the publisher restarted: its sequence begins again
            log.info("KV event publisher on topic %r restarted (seq %d after %d)", topic, seq, last)
        self.last_seq[topic] = seq
        return topic, seq, batch

    def _drop(self, reason: str, exc: Exception) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning(
                "dropped a malformed KV event message (%s): %s; further ones are not logged", reason, exc
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                got = self.poll(0.1)
            except zmq.ZMQError:
                if self._stop.is_set():
                    break
                raise
            if got is not None:
                try:
                    self.on_batch(*got)
                except Exception:
                    log.exception("KV event handler failed")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self._sock.close(linger=0)
