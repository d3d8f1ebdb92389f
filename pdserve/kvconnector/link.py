"""The control channel: signed frames over TCP, one reader thread per connection (torch-free).

Every transport uses it for control messages (handshake, reserve, chunk headers, done, abort, heartbeat); the
tcp transport also carries KV bytes in frame bodies. A malformed frame is dropped, counted by reason and
logged once per peer and reason; when the stream can no longer be trusted (bad magic, wrong version,
oversized, truncated) the connection is closed, and the listener keeps accepting others.

Sessions: before any frame, each side sends a hello (magic, frame version, 32 random bytes). Both derive one
key per direction from the shared secret and the two nonces, and sign every frame with the sending direction's
key and its sequence number (0, 1, 2, ... per direction). A frame replayed or reordered on a link, a frame
from another session (a captured handshake replayed on a new connection: the other side's nonce differs), or
one from a peer without the secret fails its MAC or its sequence, and the link is closed. Frames are read as
the wire layer allows (wire/frames.py): the fixed signed prefix first, then the header within its limit, then
the body in bounded chunks and only as large as its message type allows, so an unauthenticated peer makes us
allocate nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Optional

from pdserve.kvconnector import link_tls
from pdserve.wire.bind import warn_if_wildcard
from pdserve.wire.frames import (
    FRAME_VERSION,
    MAC_SIZE,
    SIGNED_PREFIX_SIZE,
    FrameTooLarge,
    GarbageFrame,
    ReplayedFrame,
    SignedCodec,
    TruncatedFrame,
    VersionMismatch,
    WireError,
    body_limit,
)

log = logging.getLogger(__name__)

OnMessage = Callable[["Link", Any, memoryview], None]  # (link, message struct, body)
OnClose = Callable[["Link", str], None]  # (link, why)
OnDrop = Callable[["Link", str], None]  # (link, reason)

HELLO = struct.Struct("!4sB32s")  # magic, frame version, nonce
HELLO_MAGIC = b"PDSH"
HELLO_TIMEOUT_S = 10.0
RECV_CHUNK = 16 << 20  # a body arrives in reads of at most this much


class Link:
    """One TCP connection carrying signed frames both ways. send() is thread-safe; receiving runs on a
    thread."""

    def __init__(
        self,
        sock: socket.socket,
        codec: SignedCodec,
        on_message: OnMessage,
        on_close: Optional[OnClose] = None,
        on_drop: Optional[OnDrop] = None,
        name: str = "",
        initiator: bool = False,
    ):
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
        self.initiator = initiator  # the connecting side; the session keys differ per direction
        self.encrypted = link_tls.enabled()  # TLS under the session (kvconnector/link_tls.py), set up first
        self._session = threading.Event()
        self._tx_key = self._rx_key = b""
        self._tx_seq = self._rx_seq = 0
        self._thread = threading.Thread(target=self._read_loop, name=f"kv-link-{self.name}", daemon=True)

    def start(self) -> "Link":
        self._thread.start()
        return self

    # ------------------------------------------------------------------------------------------------ sending

    def send(self, msg, body: Any = b"", blocking: bool = True) -> bool:
        """Send one message (+ raw body). Raises ConnectionError when the link is closed or breaks.

        blocking=False (heartbeats) gives up at once, returning False, while another send holds the link."""
        if not self._session.wait(HELLO_TIMEOUT_S if blocking else 0):
            if not blocking and not self.closed:
                return False
            raise ConnectionError(f"link {self.name}: no session (the peer's hello never came)")
        if not self._send_lock.acquire(blocking=blocking):
            return False
        try:
            if self.closed:
                raise ConnectionError(f"link {self.name} is closed")
            # Signed under the lock: sequence numbers must go out in the order they were given.
            parts = self.codec.encode(msg, body, seq=self._tx_seq, key=self._tx_key)
            self._tx_seq += 1
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
        """Tests only: put arbitrary bytes on the wire (after the session's hello)."""
        self._session.wait(HELLO_TIMEOUT_S)
        with self._send_lock:
            self.sock.sendall(data)

    # ---------------------------------------------------------------------------------------------- receiving

    def _hello(self) -> None:
        """Exchange nonces and derive this session's keys (on the reader thread, before any frame); with
        encryption on, over TLS, and the keys bound to that TLS channel."""
        if self.encrypted:
            try:
                self.sock = link_tls.wrap(self.sock, server=not self.initiator)
            except (OSError, ValueError) as exc:
                raise GarbageFrame(f"no TLS session: {exc}") from None
        nonce = os.urandom(32)
        self.sock.settimeout(HELLO_TIMEOUT_S)
        try:
            self.sock.sendall(HELLO.pack(HELLO_MAGIC, FRAME_VERSION, nonce))
            theirs = _recv_exact(self.sock, HELLO.size, eof_ok=True)
        except socket.timeout:
            raise TruncatedFrame(f"no hello from the peer in {HELLO_TIMEOUT_S:g}s") from None
        if theirs is None:
            raise EOFError
        magic, version, peer_nonce = HELLO.unpack(bytes(theirs))
        if magic != HELLO_MAGIC:
            raise GarbageFrame(f"bad hello magic {magic!r}")
        if version != FRAME_VERSION:
            raise VersionMismatch(f"peer speaks frame version {version}, this node {FRAME_VERSION}")
        self.sock.settimeout(None)
        ours_first = (nonce, peer_nonce) if self.initiator else (peer_nonce, nonce)
        channel = link_tls.binding(self.sock)
        parts = (*ours_first, channel) if channel is not None else ours_first
        forward = self.codec.frames.derive(b"pdserve-link initiator->acceptor", *parts)
        backward = self.codec.frames.derive(b"pdserve-link acceptor->initiator", *parts)
        self._tx_key, self._rx_key = (forward, backward) if self.initiator else (backward, forward)
        self._session.set()

    def _read_loop(self) -> None:
        why = "peer closed"
        try:
            try:
                self._hello()
            except WireError as exc:
                self._dropped(exc)
                raise EOFError from None
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
        except EOFError:
            why = "no session"
        except OSError as exc:
            why = f"socket error: {exc}"
        finally:
            self.close(why)
            self.sock.close()  # only here, by the thread that reads it (see _close_locked)

    def _read_frame(self):
        first = _recv_exact(self.sock, SIGNED_PREFIX_SIZE, eof_ok=True)
        if first is None:
            raise EOFError
        frames = self.codec.frames
        pre, mac = frames.open_prefix(bytes(first), key=self._rx_key)  # nothing is believed before this
        if pre.seq != self._rx_seq:
            raise ReplayedFrame(f"frame sequence {pre.seq}, expected {self._rx_seq}: replayed or reordered")
        self._rx_seq += 1
        header = bytes(_recv_exact(self.sock, pre.header_len))
        frames.check_tag(mac, header, bytes(_recv_exact(self.sock, MAC_SIZE)), "header")
        try:
            msg = self.codec.schema.decode(header, pre.schema_version)
        except WireError as exc:
            if exc.recoverable:  # an authenticated frame this node cannot use: step over it, keep the link
                self._skip(pre.body_len + MAC_SIZE)
            raise
        if pre.body_len and pre.body_len != body_limit(msg):
            raise FrameTooLarge(
                f"{type(msg).__name__} declares a {pre.body_len}-byte body; its type allows {body_limit(msg)}"
            )
        body = (
            memoryview(_recv_exact(self.sock, pre.body_len, progress=self._alive))
            if pre.body_len
            else memoryview(b"")
        )
        frames.check_tag(mac, body, bytes(_recv_exact(self.sock, MAC_SIZE)), "body")
        return msg, body

    def _skip(self, n: int) -> None:
        while n > 0:
            n -= len(_recv_exact(self.sock, min(n, RECV_CHUNK)))

    def _alive(self) -> None:  # a long body is still arriving: the peer is not silent
        self.last_rx = time.monotonic()

    def _dropped(self, exc: WireError) -> None:
        if self.on_drop is not None:
            self.on_drop(self, exc.reason)
        if exc.reason not in self._logged:
            self._logged.add(exc.reason)
            log.warning(
                "link %s: dropped a frame (%s): %s; further %s drops from this peer are not logged",
                self.name,
                exc.reason,
                exc,
                exc.reason,
            )

    # ------------------------------------------------------------------------------------------------ closing

    def close(self, why: str = "closed") -> None:
        with self._send_lock:
            self._close_locked(why)

    def _close_locked(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader: its recv() returns end of stream
        except OSError:
            pass
        # The descriptor itself is closed by the reader thread once it ends. Closed here, from another
        # thread (the reaper, a sender), while the reader was between two recv() calls, its number went to
        # the next connection accepted, and the old reader read that new link's bytes: a link reopened after
        # a peer's SIGSTOP failed its MAC, then its magic, two seconds later (fault campaign, 2026-12-04).
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            self.sock.close()
        log.info("link %s closed: %s", self.name, why)
        if self.on_close is not None:
            # Off this thread: the callback may take connector locks held by a sender blocked on this link.
            threading.Thread(target=self.on_close, args=(self, why), daemon=True).start()


def _sendall_parts(sock: socket.socket, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    if link_tls.is_tls(sock):  # no scatter-gather send over TLS: one record stream per part
        for view in views:
            sock.sendall(view)
        return
    while views:
        sent = sock.sendmsg(views[:64])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _recv_exact(
    sock: socket.socket, n: int, eof_ok: bool = False, progress: Optional[Callable[[], None]] = None
) -> Optional[bytearray]:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, RECV_CHUNK))
        if k == 0:
            if eof_ok and got == 0:
                return None
            raise TruncatedFrame(f"connection ended {got} bytes into a {n}-byte read")
        got += k
        if progress is not None:
            progress()
    return buf


def connect(
    address: tuple[str, int],
    codec: SignedCodec,
    on_message: OnMessage,
    on_close: Optional[OnClose] = None,
    on_drop: Optional[OnDrop] = None,
    timeout: float = 5.0,
) -> Link:
    sock = socket.create_connection(address, timeout=timeout)
    sock.settimeout(None)
    return Link(sock, codec, on_message, on_close, on_drop, initiator=True).start()


class Listener:
    """Accepts connections on (ip, port) (port 0: ephemeral) and runs a Link for each."""

    def __init__(
        self,
        ip: str,
        port: int,
        codec: SignedCodec,
        on_message: OnMessage,
        on_close: Optional[OnClose] = None,
        on_drop: Optional[OnDrop] = None,
        on_accept: Optional[Callable[[Link], None]] = None,
    ):
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
