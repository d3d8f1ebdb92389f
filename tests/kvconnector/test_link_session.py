"""The KV link's authenticated session: replayed or reordered frames (a captured handshake on a new
connection, a captured chunk on the same link) are refused and the link closed; a peer declaring a 4 GiB body
gets nothing allocated; ZMQ senders' sequence numbers must rise per sender within a window."""

from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time

import pytest

from pdserve.kvconnector.link import Listener, connect
from pdserve.wire.frames import (
    FRAME_VERSION,
    MAGIC,
    PREFIX,
    BadMAC,
    Handshake,
    Heartbeat,
    KVChunk,
    ReplayedFrame,
    SignedCodec,
    TensorMeta,
)
from pdserve.wire.replay import ReplayGuard
from tests.harness.bad_frames import stranger_hello

SECRET = b"session-secret"


class Tap:
    """A TCP relay between a client and the listener that records what the client sent, and can inject."""

    def __init__(self, target):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()[:2]
        self.target = target
        self.sent = bytearray()
        self.upstream = None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        client, _ = self.server.accept()
        self.upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pipe, args=(client, self.upstream, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(self.upstream, client, False), daemon=True).start()

    def _pipe(self, src, dst, record):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    self.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


def handshake():
    return Handshake(
        engine_id="p",
        role="kv_producer",
        model="m",
        dtype="float16",
        block_size=16,
        num_layers=1,
        num_kv_heads=1,
        head_dim=4,
        hash_algorithm="h",
        transport="tcp",
    )


@pytest.fixture
def listener():
    got, drops, links = [], [], []
    lst = Listener(
        "127.0.0.1",
        0,
        SignedCodec(SECRET),
        lambda link, msg, body: got.append((msg, bytes(body))),
        on_drop=lambda link, reason: drops.append(reason),
        on_accept=links.append,
    )
    lst.got, lst.drops, lst.accepted = got, drops, links
    yield lst
    lst.close()


def test_replayed_handshake_and_chunk_are_refused(listener):
    tap = Tap(listener.address)
    link = connect(tap.address, SignedCodec(SECRET), lambda *a: None)
    chunk = KVChunk(
        request_id="r",
        seq=0,
        first_layer=0,
        num_layers=1,
        block_ids=[3],
        tensor=TensorMeta("float16", [1, 2, 1, 4]),
    )
    link.send(handshake())
    link.send(chunk, bytes(16))
    assert wait(lambda: len(listener.got) == 2)
    captured = bytes(tap.sent)
    # 1. the whole capture (hello, handshake, chunk) replayed on a new connection: the listener's new nonce
    # makes a new session, so the captured frames' MACs fail and nothing is delivered.
    with socket.create_connection(listener.address) as s:
        s.sendall(captured)
        s.settimeout(5)
        assert _until_closed(s)
    assert len(listener.got) == 2 and wait(lambda: listener.drops == ["hmac"])
    # 2. the captured chunk frame (the capture's tail) replayed on the live link: its sequence number is
    # spent.
    chunk_frame = captured[captured.index(MAGIC, captured.index(MAGIC) + 1) :]  # the second frame on the wire
    tap.upstream.sendall(chunk_frame)
    assert wait(lambda: link.closed)
    assert len(listener.got) == 2 and listener.drops == ["hmac", "replay"]


def test_reordered_frames_are_refused(listener):
    link = connect(listener.address, SignedCodec(SECRET), lambda *a: None)
    link._session.wait(5)
    codec = SignedCodec(SECRET)
    second = codec.encode_bytes(Heartbeat("x", 2.0), seq=1, key=link._tx_key)
    link.send_raw(second)  # frame 1 before frame 0
    assert wait(lambda: link.closed)
    assert listener.got == [] and listener.drops == ["replay"]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_declared_4_gib_body_from_a_stranger_allocates_nothing(listener):
    before = rss_mib()
    with socket.create_connection(listener.address) as s:
        # No secret: the prefix's MAC fails before its lengths are believed.
        s.sendall(stranger_hello() + PREFIX.pack(MAGIC, FRAME_VERSION, 0, 1, 10, 4 << 30, 0) + b"\x00" * 32)
        s.settimeout(5)
        assert _until_closed(s)
    assert wait(lambda: listener.drops) and listener.drops == ["hmac"]
    assert rss_mib() - before < 64


def test_a_declared_4_gib_body_on_a_type_without_one_allocates_nothing(listener):
    """A real session, but a Heartbeat carries no body: refused before the body is read."""
    before = rss_mib()
    link = connect(listener.address, SignedCodec(SECRET), lambda *a: None)
    link._session.wait(5)
    schema = SignedCodec(SECRET).schema
    header = schema.encode(Heartbeat("x", 1.0))
    prefix = PREFIX.pack(MAGIC, FRAME_VERSION, 0, schema.version, len(header), 4 << 30, 0)
    mac = hmac.new(link._tx_key, b"\x00\x00" + prefix, hashlib.sha256)  # signed as the session's frame 0
    tag1 = mac.copy().digest()
    mac.update(header)
    link.send_raw(prefix + tag1 + header + mac.digest())
    assert wait(lambda: link.closed)
    assert listener.drops == ["oversized"] and listener.got == []
    assert rss_mib() - before < 64


def _until_closed(s: socket.socket) -> bool:
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_whole_frames_need_rising_sequence_numbers_per_sender():
    guard = ReplayGuard(window_s=10)
    now = time.time_ns()
    guard.check(b"a", now, now)
    guard.check(b"b", now, now)  # another sender has its own sequence
    with pytest.raises(ReplayedFrame):
        guard.check(b"a", now, now)  # the same frame again
    with pytest.raises(ReplayedFrame):
        guard.check(b"c", now - 11 * 10**9, now)  # too old for the window, whoever sends it
    guard.check(b"a", now + 1, now)


def test_whole_frames_are_bound_to_the_sender_identity():
    codec = SignedCodec(SECRET)
    frame = codec.encode_bytes(Heartbeat("x", 1.0), context=b"from:proxy-a")
    assert codec.decode_bytes(frame, context=b"from:proxy-a")[0] == Heartbeat("x", 1.0)
    with pytest.raises(BadMAC):
        codec.decode_bytes(frame, context=b"from:proxy-b")
