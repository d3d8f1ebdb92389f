"""The node's sockets: a ZMQ ROUTER for RPC and a PUB for KV events and heartbeats, driven by one I/O thread.

ZMQ sockets are not thread-safe, so only the I/O thread touches them. Other threads (the engine loop's sinks,
the KV connector's callbacks) call `send()` / `publish()`, which queue the message and wake the I/O thread
through a socketpair that its poller watches, so a token leaves the node as soon as it is sampled (no polling
interval).

Every received frame is checked (signature, versions, schema) before anything reads it; a bad one is dropped,
counted by reason and logged once per sender and reason, and the node keeps serving. Frames are signed over
the sender's ZMQ identity ("from:" + identity towards a ROUTER, "to:" + identity from one) and carry
time-based sequence numbers that must rise per sender (wire.replay.ReplayGuard), so a captured frame replayed
to this socket, under any identity, is refused. ZMQ itself drops a peer that sends a message over MAXMSGSIZE
before we ever see it (a 100 MB frame used to be received whole and then dropped). A reply to a proxy that has
gone away (ROUTER_MANDATORY reports the identity unroutable) calls `on_unroutable(identity)` so the node can
abort that proxy's requests: a client that is gone frees its blocks.

A decode node also drives prefill nodes: `send_to(endpoint, msg)` goes out on a DEALER connected to that
endpoint (made on first use, owned by the same I/O thread); replies arrive at `on_peer_message(endpoint,
msg)`. A socket monitor on each DEALER reports a dropped connection (a killed prefill node) at once through
`on_peer_lost(endpoint)`, so its requests fail fast instead of waiting for their timeout.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve.wire import curve
from pdserve.wire.frames import DEFAULT_MAX_HEADER, WireError
from pdserve.wire.kv_events import event_frames
from pdserve.wire.replay import ReplayGuard

log = logging.getLogger(__name__)

OnMessage = Callable[[bytes, Any], None]  # (sender identity, decoded message)
MAX_LOGGED_SENDERS = 1024
CLOSE_LINGER_MS = 2000  # how long frames queued at stop may still take to leave
MAX_MSG_SIZE = DEFAULT_MAX_HEADER + 4096  # a control frame: header limit plus prefix and tags, no body


class RpcServer:
    def __init__(
        self,
        codec,
        rpc_address: str,
        events_address: Optional[str],
        on_message: OnMessage,
        on_drop: Callable[[str], None] = lambda reason: None,
        on_unroutable: Callable[[bytes], None] = lambda identity: None,
        ticks: Optional[list[tuple[float, Callable[[], None]]]] = None,
        on_peer_message: Callable[[str, Any], None] = lambda endpoint, msg: None,
        on_peer_lost: Callable[[str], None] = lambda endpoint: None,
        identity: str = "",
        secret: bytes = b"",
    ):
        self.codec = codec
        self.on_message, self.on_drop, self.on_unroutable = on_message, on_drop, on_unroutable
        self.on_peer_message, self.on_peer_lost = on_peer_message, on_peer_lost
        self.identity = identity
        self.secret = secret  # for CURVE keys (wire/curve.py), when $PDSERVE_CURVE=1
        self._dealers: dict[str, zmq.Socket] = {}
        self._monitors: dict[zmq.Socket, str] = {}
        self._poller = zmq.Poller()
        self.ctx = zmq.Context.instance()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.SNDHWM, 0)  # never drop a token for a slow reader
        self.router.setsockopt(zmq.RCVHWM, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
        curve.serve(self.router, secret)
        self.router.bind(rpc_address)
        self.rpc_endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.pub = None
        self.events_endpoint = ""
        if events_address:
            self.pub = self.ctx.socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.setsockopt(zmq.SNDHWM, 100_000)
            curve.serve(self.pub, secret)  # subscribers without the secret cannot even connect
            self.pub.bind(events_address)
            self.events_endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ticks = [[period, fn, 0.0] for period, fn in (ticks or [])]
        self._seq: dict[bytes, int] = {}
        self._replay = ReplayGuard()
        self._sign_lock = threading.Lock()
        self._dealer_ids: dict[str, bytes] = {}
        self._logged: set[tuple[bytes, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-rpc", daemon=True)

    def start(self) -> "RpcServer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- any thread ----------------------------------------------------------------------------------------
    def send(self, identity: bytes, msg) -> None:
        """Queue one message for the DEALER behind identity."""
        with self._sign_lock:  # frames must join the outbox in the order of their sequence numbers
            self._outbox.put(("rpc", identity, b"".join(self.codec.encode(msg, context=b"to:" + identity))))
        self._wake()

    def send_to(self, endpoint: str, msg) -> None:
        """Queue one message for the node whose ROUTER listens at endpoint (tcp://host:port)."""
        self._outbox.put(("dealer", endpoint, msg))  # signed on the I/O thread, which names the DEALER
        self._wake()

    def publish(self, topic: bytes, payload: bytes) -> None:
        """Queue (topic, 8-byte big-endian sequence number per topic, payload) on the PUB socket."""
        if self.pub is not None:
            self._outbox.put(("pub", topic, payload))
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the thread is awake anyway) or closed (stopping)

    # ---- the I/O thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        poller = self._poller
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(timeout=self._poll_timeout_ms()))
                # pyzmq reports a plain socket by its fd, not by the object registered: checking the object
                # never drained the wake pipe, so poll() returned at once forever (a core burnt, the GIL
                # fought)
                if self._wake_r.fileno() in events:
                    self._drain_wake()
                for sock in events:
                    if sock is self.router:
                        self._receive_all(sock, None)
                    elif sock in self._monitors:
                        self._monitor_event(sock)
                    elif isinstance(sock, zmq.Socket):
                        self._receive_all(sock, self._endpoint_of(sock))
                self._flush_outbox()
                self._run_ticks()
            self._flush_outbox()
        except Exception:
            log.exception("node rpc thread died")
            raise
        finally:
            # The last flush only queued frames in ZMQ: a linger lets them leave (a drained request's final
            # Tokens among them) when the process ends the context (node_cli: zmq context destroy).
            for sock in [self.router, self.pub, *self._dealers.values()]:
                if sock is not None:
                    sock.close(CLOSE_LINGER_MS)
            for sock in self._monitors:
                sock.close(0)
            self._wake_r.close()
            self._wake_w.close()

    def _poll_timeout_ms(self) -> int:
        if not self._ticks:
            return 100
        now = time.monotonic()
        due = min(last + period for period, _, last in self._ticks)
        return max(0, min(100, int((due - now) * 1000) + 1))

    def _run_ticks(self) -> None:
        now = time.monotonic()
        for tick in self._ticks:
            if now - tick[2] >= tick[0]:
                tick[2] = now
                try:
                    tick[1]()
                except Exception:
                    log.exception("node tick %s failed", getattr(tick[1], "__qualname__", tick[1]))

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _receive_all(self, sock: zmq.Socket, endpoint: Optional[str]) -> None:
        """Drain a ROUTER (endpoint None: parts are [identity, (b"",) payload]) or a DEALER to endpoint."""
        for _ in range(1000):  # bounded, so sends and ticks are not starved by a flood
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            identity = parts[0] if endpoint is None else endpoint.encode()
            payload = parts[-1]
            if len(parts) < (2 if endpoint is None else 1):
                self._dropped(identity, "garbage", "a message without a payload part")
                continue
            try:
                if endpoint is None:
                    msg, _, seq = self.codec.decode_frame(payload, context=b"from:" + identity)
                else:
                    msg, _, seq = self.codec.decode_frame(
                        payload, context=b"to:" + self._dealer_ids[endpoint]
                    )
                self._replay.check((b"r:" if endpoint is None else b"d:") + identity, seq)
            except WireError as exc:
                self._dropped(identity, exc.reason, str(exc))
                continue
            except Exception as exc:  # anything else a hostile frame provokes is still just a bad frame
                self._dropped(identity, "garbage", repr(exc))
                continue
            try:
                if endpoint is None:
                    self.on_message(identity, msg)
                else:
                    self.on_peer_message(endpoint, msg)
            except Exception:
                log.exception("handling %s from %r failed", type(msg).__name__, identity)

    def _dropped(self, identity: bytes, reason: str, detail: str) -> None:
        self.on_drop(reason)
        key = (identity, reason)
        if key not in self._logged and len(self._logged) < MAX_LOGGED_SENDERS:
            self._logged.add(key)
            log.warning(
                "dropped a frame from %r (%s): %s; further %s drops from it are not logged",
                identity,
                reason,
                detail,
                reason,
            )

    def _flush_outbox(self) -> None:
        while True:
            try:
                kind, key, data = self._outbox.get_nowait()
            except queue.Empty:
                return
            if kind == "rpc":
                try:
                    self.router.send_multipart([key, data], zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EHOSTUNREACH:
                        self._unroutable(key)
                    else:
                        log.warning("rpc send to %r failed: %s", key, exc)
            elif kind == "dealer":
                try:
                    sock = self._dealer(key)
                    frame = self.codec.encode_bytes(data, context=b"from:" + self._dealer_ids[key])
                    sock.send(frame, zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    log.warning("send to %s failed: %s", key, exc)
                    self._peer_lost(key)
            else:
                seq = self._seq.get(key, 0)
                self._seq[key] = seq + 1
                try:
                    self.pub.send_multipart(event_frames(key, seq, data), zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    log.debug("publish on %r dropped: %s", key, exc)

    def _dealer(self, endpoint: str) -> zmq.Socket:
        sock = self._dealers.get(endpoint)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
            curve.client(sock, self.secret)
            # Frames are signed over this identity, so it is always set (never ZMQ's random one).
            dealer_id = f"{self.identity or 'node'}-{len(self._dealers)}-{os.urandom(4).hex()}".encode()
            sock.setsockopt(zmq.IDENTITY, dealer_id)
            self._dealer_ids[endpoint] = dealer_id
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(endpoint)
            self._dealers[endpoint] = sock
            self._monitors[monitor] = endpoint
            self._poller.register(sock, zmq.POLLIN)
            self._poller.register(monitor, zmq.POLLIN)
        return sock

    def _endpoint_of(self, sock: zmq.Socket) -> str:
        return next((e for e, s in self._dealers.items() if s is sock), "?")

    def _monitor_event(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._peer_lost(self._monitors[monitor])

    def _peer_lost(self, endpoint: str) -> None:
        log.warning("connection to %s lost", endpoint)
        try:
            self.on_peer_lost(endpoint)
        except Exception:
            log.exception("on_peer_lost failed")

    def _unroutable(self, identity: bytes) -> None:
        try:
            self.on_unroutable(identity)
        except Exception:
            log.exception("on_unroutable failed")
