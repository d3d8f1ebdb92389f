"""The proxy's side of the node rpc sockets: one DEALER per node, replies routed to per-request queues.

Every frame is signed over this proxy's DEALER identity and schema-checked (wire.node_messages), and its
sequence number must rise per node (wire.frames.ReplayGuard); a bad one is counted, logged once per node and
reason, and dropped. ZMQ drops a node that sends a message over MAXMSGSIZE. Replies for a request nobody waits
for any more (aborted, finished) are ignored. Sockets are made on first use and set IMMEDIATE, so a send to a
node with no live connection fails at once (zmq.Again -> NodeUnreachable) instead of queueing behind a dead
peer. Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq
import zmq.asyncio

from pdserve.wire import curve
from pdserve.wire.frames import DEFAULT_MAX_HEADER, SignedCodec, WireError
from pdserve.wire.node_messages import Abort, Error, PromptLogprobs, Tokens
from pdserve.wire.replay import ReplayGuard

log = logging.getLogger(__name__)


class NodeUnreachable(Exception):
    pass


class NodeRpc:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        codec: SignedCodec,
        identity: str,
        on_drop: Callable[[str], None] = lambda reason: None,
        on_alive: Callable[[str], None] = lambda rpc: None,
        secret: bytes = b"",
    ):
        self.ctx = ctx
        self.codec = codec
        self.identity = identity.encode()
        self.on_drop = on_drop
        self.on_alive = on_alive  # any valid frame from a node is a sign of life
        self.secret = secret  # CURVE keys when $PDSERVE_CURVE=1
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._readers: dict[str, asyncio.Task] = {}
        self._queues: dict[str, asyncio.Queue] = {}
        self._logged: set[tuple[str, str]] = set()
        self._background: set[asyncio.Task] = set()
        self._replay = ReplayGuard()

    # ---- streams -------------------------------------------------------------------------------------------
    def open(self, request_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def deliver(self, request_id: str, item) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    # ---- sending -------------------------------------------------------------------------------------------
    def _socket(self, endpoint: str) -> zmq.asyncio.Socket:
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self.identity)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, DEFAULT_MAX_HEADER + 4096)
            curve.client(sock, self.secret)
            sock.connect(endpoint)
            self._sockets[endpoint] = sock
            self._readers[endpoint] = asyncio.create_task(self._read(endpoint, sock), name=f"rpc {endpoint}")
        return sock

    def connect(self, endpoint: str) -> None:
        """Open the connection ahead of the first request (a fresh DEALER needs a moment to connect)."""
        self._socket(endpoint)

    async def send(self, endpoint: str, msg, timeout_s: float = 1.0) -> None:
        """Send one message; NodeUnreachable when no connection to the node completes within timeout_s."""
        sock = self._socket(endpoint)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            # Signed at each try: another send may have gone out while this one waited, and the node wants
            # this proxy's sequence numbers in the order its frames arrive.
            frame = self.codec.encode_bytes(msg, context=b"from:" + self.identity)
            try:
                await sock.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:
                if loop.time() >= deadline:
                    raise NodeUnreachable(f"no connection to node rpc {endpoint}") from None
                await asyncio.sleep(0.01)

    def abort_soon(self, endpoint: str, request_id: str, reason: str) -> None:
        """Fire-and-forget Abort, safe from `finally` blocks of cancelled tasks."""

        async def go():
            try:
                await self.send(endpoint, Abort(request_id=request_id, reason=reason), timeout_s=0.5)
            except Exception as exc:  # noqa: BLE001 - the node may be gone; nothing else to do
                log.debug("abort %s on %s not sent: %s", request_id, endpoint, exc)

        task = asyncio.get_running_loop().create_task(go())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- receiving -----------------------------------------------------------------------------------------
    async def _read(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        while True:
            parts = await sock.recv_multipart(copy=True)
            if not parts:
                continue
            try:
                msg, _, seq = self.codec.decode_frame(parts[-1], context=b"to:" + self.identity)
                self._replay.check(endpoint.encode(), seq)
            except WireError as exc:
                self._dropped(endpoint, exc.reason, str(exc))
                continue
            if not isinstance(msg, (Tokens, Error, PromptLogprobs)):
                self._dropped(endpoint, "unexpected", type(msg).__name__)
                continue
            self.on_alive(endpoint)
            self.deliver(msg.request_id, msg)

    def _dropped(self, endpoint: str, reason: str, detail: str) -> None:
        self.on_drop(reason)
        if (endpoint, reason) not in self._logged:
            self._logged.add((endpoint, reason))
            log.warning("dropped a %s frame from node %s: %s (logged once)", reason, endpoint, detail)

    async def close_all(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=1.0)
        for task in self._readers.values():
            task.cancel()
        await asyncio.gather(*self._readers.values(), return_exceptions=True)
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
        self._readers.clear()
