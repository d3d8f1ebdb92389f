"""A scripted fake node: real ZMQ sockets and real signed frames (the proxy cannot tell it from a node),
heartbeats, KV events, scripted token streams and recorded messages. The `fake_nodes` fixture stops every node
it made in its teardown."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Optional

import msgpack
import pytest
import zmq

from pdserve.wire.hashing import external_block_hash, hash_prompt_blocks
from pdserve.wire.kv_events import BlockRemoved, BlockStored, KVEventBatch, encode_batch
from pdserve.wire.node_messages import (
    TOPIC_HEARTBEAT,
    TOPIC_KV_EVENTS,
    Abort,
    Error,
    Generate,
    Tokens,
    make_codec,
    prompt_logprob_pieces,
)
from tests.harness.servers import SECRET


@dataclass
class Script:
    """How a FakeNode answers a Generate."""

    tokens: Optional[list[int]] = None  # None: max_tokens ids counting up from 300
    delay_s: float = 0.0  # between token messages
    error: Optional[tuple[int, str, bool]] = None  # (status, message, retryable) instead of tokens
    node_draining: bool = False  # the error says this node is shutting down (as a draining node refuses)
    hang: bool = False  # never answer
    cached_tokens: int = 0
    finish_reason: str = "length"
    per_message: int = 1  # tokens per Tokens message


class FakeNode:
    """A node on real sockets: ROUTER rpc + PUB events, heartbeats, scripted token streams, recorded
    messages."""

    def __init__(
        self,
        node_id: str,
        role: str = "decode",
        block_size: int = 16,
        total_blocks: int = 1000,
        heartbeat_s: float = 0.1,
        secret: bytes = SECRET,
        ports: tuple[int, int] = (0, 0),  # (rpc, events); 0: a random free one. Fixed: a restart
    ):
        self.node_id, self.role, self.block_size = node_id, role, block_size
        self.total_blocks, self.free_blocks = total_blocks, total_blocks
        self.heartbeat_s = heartbeat_s
        self.codec = make_codec(secret)
        self.script = Script()
        self.scripts: dict[str, Script] = {}  # per request id prefix
        self.received: list = []  # decoded messages, in order
        self.num_waiting = 0
        self.beating = True
        self.draining = False  # what heartbeats say
        self.incarnation = os.urandom(8).hex()  # a new FakeNode under an old id is a restarted node
        self._stop = threading.Event()
        self._outbox: list = []
        self._lock = threading.Lock()
        self._seq = {TOPIC_HEARTBEAT: 0, TOPIC_KV_EVENTS: 0}
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.rpc_port = _bind(self.router, ports[0])
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.events_port = _bind(self.pub, ports[1])
        self.active: dict[str, bool] = {}  # request id -> still streaming
        self.thread = threading.Thread(target=self._run, name=f"fake-{node_id}", daemon=True)

    @property
    def rpc(self) -> str:
        return f"tcp://127.0.0.1:{self.rpc_port}"

    @property
    def events(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"

    def start(self) -> "FakeNode":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()

    # ---- test controls -------------------------------------------------------------------------------------
    def store_prompt(self, token_ids: list[int]) -> list[int]:
        """Publish BlockStored for the prompt's full blocks; returns their external hashes."""
        hashes = [external_block_hash(h) for h in hash_prompt_blocks(token_ids, self.block_size)]
        n = len(hashes) * self.block_size
        ev = BlockStored(
            block_hashes=hashes,
            parent_block_hash=None,
            token_ids=list(token_ids[:n]),
            block_size=self.block_size,
        )
        self.publish_events([ev])
        return hashes

    def remove_blocks(self, hashes: list[int]) -> None:
        self.publish_events([BlockRemoved(block_hashes=hashes)])

    def publish_events(self, events: list) -> None:
        with self._lock:
            self._outbox.append(
                ("pub", TOPIC_KV_EVENTS, encode_batch(KVEventBatch(ts=time.time(), events=events)))
            )

    def messages(self, kind) -> list:
        return [m for m in list(self.received) if isinstance(m, kind)]

    # ---- loop ----------------------------------------------------------------------------------------------
    def _heartbeat(self) -> bytes:
        return msgpack.packb(
            {
                "node_id": self.node_id,
                "role": self.role,
                "rpc": self.rpc,
                "http": "http://127.0.0.1:1",
                "num_waiting": self.num_waiting,
                "num_running": sum(self.active.values()),
                "free_blocks": self.free_blocks,
                "total_blocks": self.total_blocks,
                "block_size": self.block_size,
                "ts": time.time(),
                "draining": self.draining,
                "incarnation": self.incarnation,
            }
        )

    def _publish(self, topic: bytes, payload: bytes) -> None:
        seq = self._seq[topic]
        self._seq[topic] = seq + 1
        self.pub.send_multipart([topic, seq.to_bytes(8, "big"), payload])

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        next_beat = 0.0
        timers: list[tuple[float, bytes, object]] = []  # (due, identity, message)
        while not self._stop.is_set():
            now = time.monotonic()
            if self.beating and now >= next_beat:
                self._publish(TOPIC_HEARTBEAT, self._heartbeat())
                next_beat = now + self.heartbeat_s
            with self._lock:
                out, self._outbox = self._outbox, []
            for _kind, topic, payload in out:
                self._publish(topic, payload)
            due = [t for t in timers if t[0] <= now]
            timers = [t for t in timers if t[0] > now]
            for _, identity, msg in due:
                if isinstance(msg, Tokens) and not self.active.get(msg.request_id, False):
                    continue  # aborted meanwhile
                if isinstance(msg, Tokens) and msg.finished:
                    self.active[msg.request_id] = False
                self.router.send_multipart(
                    [identity, self.codec.encode_bytes(msg, context=b"to:" + identity)]
                )
            if dict(poller.poll(10)):
                while True:
                    try:
                        parts = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    identity, frame = parts[0], parts[-1]
                    try:
                        msg, _ = self.codec.decode_bytes(frame, context=b"from:" + identity)
                    except Exception as exc:  # noqa: BLE001
                        self.received.append(exc)
                        continue
                    self.received.append(msg)
                    timers.extend(self._answer(identity, msg, time.monotonic()))

    def _script_for(self, request_id: str) -> Script:
        for prefix, script in self.scripts.items():
            if request_id.startswith(prefix):
                return script
        return self.script

    def _answer(self, identity: bytes, msg, now: float) -> list:
        if isinstance(msg, Abort):
            if self.active.get(msg.request_id):
                self.active[msg.request_id] = False
                return [
                    (
                        now,
                        identity,
                        Tokens(request_id=msg.request_id, token_ids=[], finished=True, finish_reason="abort"),
                    )
                ]
            return []
        if not isinstance(msg, Generate):
            return []
        script = self._script_for(msg.request_id)
        if script.hang:
            self.active[msg.request_id] = True
            return []
        if script.error is not None:
            status, text, retryable = script.error
            return [
                (
                    now,
                    identity,
                    Error(
                        request_id=msg.request_id,
                        status=status,
                        message=text,
                        retryable=retryable,
                        node_draining=script.node_draining,
                    ),
                )
            ]
        self.active[msg.request_id] = True
        params = msg.params
        max_tokens = params.get("max_tokens") or 16
        tokens = list(script.tokens) if script.tokens is not None else [300 + i for i in range(max_tokens)]
        tokens = tokens[:max_tokens]
        seed = params.get("seed")
        if seed is not None and script.tokens is None:
            tokens = [300 + (seed * 7 + i) % 200 for i in range(len(tokens))]
        want = params.get("logprobs")
        out, t = [], now
        k = params.get("prompt_logprobs")
        if k is not None:  # synthetic records before the first token, as a node sends them: position i's
            # token has logprob -i/100 and rank 3, its top ids are i + 10, i + 11
            positions = range(1, len(msg.prompt_token_ids))
            records = [None] + [[[i + 10, i + 11][:k], [-0.25, -0.75][:k], -i / 100, 3] for i in positions]
            out += [(now, identity, piece) for piece in prompt_logprob_pieces(msg.request_id, records)]
        for start in range(0, len(tokens), script.per_message):
            chunk = tokens[start : start + script.per_message]
            last = start + script.per_message >= len(tokens)
            lps = None
            if want is not None:
                lps = [[[tid, tid + 1][:want], [-0.5, -1.5][:want], -0.5, 1] for tid in chunk]
            t += script.delay_s
            out.append(
                (
                    t,
                    identity,
                    Tokens(
                        request_id=msg.request_id,
                        token_ids=chunk,
                        logprobs=lps,
                        finished=last,
                        finish_reason=(script.finish_reason if len(tokens) < max_tokens else "length")
                        if last
                        else None,
                        num_cached_tokens=script.cached_tokens,
                        timings={
                            "prefill_queue": 0.001,
                            "prefill": 0.002,
                            "transfer": 0.003,
                            "exposed_transfer": 0.0005,
                            "decode_queue": 0.0001,
                        }
                        if last
                        else None,
                    ),
                )
            )
        return out


def _bind(sock: zmq.Socket, port: int) -> int:
    if not port:
        return sock.bind_to_random_port("tcp://127.0.0.1")
    sock.bind(f"tcp://127.0.0.1:{port}")
    return port


@pytest.fixture
def fake_nodes():
    made: list[FakeNode] = []

    def make(node_id: str, role: str = "decode", **kw) -> FakeNode:
        node = FakeNode(node_id, role, **kw).start()
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.stop()
