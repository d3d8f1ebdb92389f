"""The control channel: signed frames over TCP, one reader thread per connection (torch-free).

Every transport uses it for control messages (handshake, reserve, chunk headers, done, abort, heartbeat); the tcp
transport also carries KV bytes in frame bodies. A malformed frame is dropped, counted by reason and logged once
per peer and reason; when the stream can no longer be trusted (bad magic, wrong version, oversized, truncated)
the connection is closed, and the listener keeps accepting others.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, Callable, Optional

from kvconnector.bind import warn_if_wildcard
from kvconnector.wire import MAC_SIZE, PREFIX_SIZE, SignedCodec, TruncatedFrame, WireError

log = logging.getLogger(__name__)

OnMessage = Callable[["Link", Any, memoryview], None]  # (link, message struct, body)
OnClose = Callable[["Link", str], None]  # (link, why)
OnDrop = Callable[["Link", str], None]  # (link, reason)


class Link:
    """One TCP connection carrying signed frames both ways. send() is thread-safe; receiving runs on a thread."""

    def __init__(self, sock: socket.socket, codec: SignedCodec, on_message: OnMessage,
                 on_close: Optional[OnClose] = None, on_drop: Optional[OnDrop] = None, name: str = ""):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.codec = sock, codec
        self.on_message, self.on_close, self.on_drop = on_message, on_close, on_drop
        try:
            peer = "%s:%d" % sock.getpeername()[:2]
        except OSError:
            peer = "?"
        self.name = name or peer
        self.peer: Any = None  # the peer's Handshake, set by the connector
        self.state: dict = {}  # per-link data the connector and the data plane keep
        self.last_rx = self.last_tx = time.monotonic()
        self.closed = False
        self._send_lock = threading.Lock()
        self._logged: set[str] = set()
        self._thread = threading.Thread(target=self._read_loop, name=f"kv-link-{self.name}", daemon=True)

    def start(self) -> "Link":
        self._thread.start()
        return self

    # ------------------------------------------------------------------------------------------------ sending

    def send(self, msg, body: Any = b"", blocking: bool = True) -> bool:
        """Send one message (+ raw body). Raises ConnectionError when the link is closed or breaks.

        blocking=False (heartbeats) gives up at once, returning False, while another send holds the link."""
        parts = self.codec.encode(msg, body)
        if not self._send_lock.acquire(blocking=blocking):
            return False
        try:
            if self.closed:
                raise ConnectionError(f"link {self.name} is closed")
            try:
                _sendall_parts(self.sock, parts)
            except OSError as exc:
                self._close_locked(f"send failed: {exc}")
                raise ConnectionError(f"link {self.name}: {exc}") from None
            self.last_tx = time.monotonic()
            return True
        finally:
            self._send_lock.release()

    def send_raw(self, data: bytes) -> None:
        """Tests only: put arbitrary bytes on the wire."""
        with self._send_lock:
            self.sock.sendall(data)

    # ------------------------------------------------------------------------------------------------ receiving

    def _read_loop(self) -> None:
        why = "peer closed"
        try:
            while True:
                try:
                    msg, body = self._read_frame()
                except WireError as exc:
                    self._dropped(exc)
                    if exc.recoverable:
                        continue
                    why = f"bad frame ({exc.reason})"
                    break
                except EOFError:
                    break
                self.last_rx = time.monotonic()
                try:
                    self.on_message(self, msg, body)
                except Exception:  # a handler bug must not kill the link silently
                    log.exception("link %s: handling %s failed", self.name, type(msg).__name__)
        except OSError as exc:
            why = f"socket error: {exc}"
        self.close(why)

    def _read_frame(self):
        first = _recv_exact(self.sock, PREFIX_SIZE, eof_ok=True)
        if first is None:
            raise EOFError
        prefix = bytes(first)
        pre = self.codec.frames.decode_prefix(prefix)
        header = bytes(_recv_exact(self.sock, pre.header_len))
        body = memoryview(_recv_exact(self.sock, pre.body_len, progress=self._alive)) if pre.body_len \
            else memoryview(b"")
        mac = bytes(_recv_exact(self.sock, MAC_SIZE))
        self.codec.frames.verify(prefix, header, body, mac)
        return self.codec.schema.decode(header, pre.schema_version), body

    def _alive(self) -> None:  # a long body is still arriving: the peer is not silent
        self.last_rx = time.monotonic()

    def _dropped(self, exc: WireError) -> None:
        if self.on_drop is not None:
            self.on_drop(self, exc.reason)
        if exc.reason not in self._logged:
            self._logged.add(exc.reason)
            log.warning("link %s: dropped a frame (%s): %s; further %s drops from this peer are not logged",
                        self.name, exc.reason, exc, exc.reason)

    # ------------------------------------------------------------------------------------------------ closing

    def close(self, why: str = "closed") -> None:
        with self._send_lock:
            self._close_locked(why)

    def _close_locked(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        log.info("link %s closed: %s", self.name, why)
        if self.on_close is not None:
            # Off this thread: the callback may take connector locks held by a sender blocked on this link.
            threading.Thread(target=self.on_close, args=(self, why), daemon=True).start()


def _sendall_parts(sock: socket.socket, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views[:64])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _recv_exact(sock: socket.socket, n: int, eof_ok: bool = False,
                progress: Optional[Callable[[], None]] = None) -> Optional[bytearray]:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 16 << 20))
        if k == 0:
            if eof_ok and got == 0:
                return None
            raise TruncatedFrame(f"connection ended {got} bytes into a {n}-byte read")
        got += k
        if progress is not None:
            progress()
    return buf


def connect(address: tuple[str, int], codec: SignedCodec, on_message: OnMessage, on_close: Optional[OnClose] = None,
            on_drop: Optional[OnDrop] = None, timeout: float = 5.0) -> Link:
    sock = socket.create_connection(address, timeout=timeout)
    sock.settimeout(None)
    return Link(sock, codec, on_message, on_close, on_drop).start()


class Listener:
    """Accepts connections on (ip, port) (port 0: ephemeral) and runs a Link for each."""

    def __init__(self, ip: str, port: int, codec: SignedCodec, on_message: OnMessage,
                 on_close: Optional[OnClose] = None, on_drop: Optional[OnDrop] = None,
                 on_accept: Optional[Callable[[Link], None]] = None):
        warn_if_wildcard("KV listener", ip)
        self.sock = socket.create_server((ip, port), reuse_port=False)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.codec, self.on_message, self.on_close, self.on_drop = codec, on_message, on_close, on_drop
        self.on_accept = on_accept
        self.links: list[Link] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="kv-listener", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                break
            link = Link(sock, self.codec, self.on_message, self.on_close, self.on_drop)
            self.links = [x for x in self.links if not x.closed] + [link]
            if self.on_accept is not None:
                self.on_accept(link)
            link.start()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        for link in list(self.links):
            link.close("listener closed")
