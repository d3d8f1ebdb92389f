"""Frames and schemas: round trips, and a typed error for every kind of bad input (in process, fast)."""

import logging
import socket
import subprocess
import sys
import time

import msgspec
import pytest

from pdserve.kvconnector.link import Listener
from pdserve.wire import frames as wire
from pdserve.wire.frames import (
    BadMAC,
    Done,
    FrameTooLarge,
    GarbageFrame,
    Handshake,
    Heartbeat,
    KVChunk,
    SchemaError,
    SignedCodec,
    TensorMeta,
    TruncatedFrame,
    VersionMismatch,
)
from tests.harness.bad_frames import bad_frame

SECRET = b"test-secret"


def handshake(**kw):
    base = dict(
        engine_id="e1",
        role="kv_producer",
        model="m",
        dtype="bfloat16",
        block_size=16,
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        hash_algorithm="sha256-msgpack-v1",
        transport="tcp",
    )
    return Handshake(**{**base, **kw})


def test_round_trip_with_body():
    codec = SignedCodec(SECRET)
    chunk = KVChunk(
        request_id="r",
        seq=3,
        first_layer=2,
        num_layers=1,
        block_ids=[5, 9],
        tensor=TensorMeta("float16", [1, 2, 2, 4]),
    )
    body = bytes(range(32))
    msg, got = codec.decode_bytes(codec.encode_bytes(chunk, body))
    assert msg == chunk and bytes(got) == body
    for m in (
        handshake(data_plane={"ipc": [0, b"\x00\x01", 7], "host": "h"}),
        Done("r", 1 << 40),
        Heartbeat("e", 1.5),
    ):
        assert codec.decode_bytes(codec.encode_bytes(m))[0] == m


@pytest.mark.parametrize(
    "kind,exc",
    [
        ("garbage", GarbageFrame),
        ("version", VersionMismatch),
        ("oversized", FrameTooLarge),
        ("truncated", TruncatedFrame),
        ("hmac", BadMAC),
        ("schema", SchemaError),
        ("schema_version", VersionMismatch),
    ],
)
def test_each_bad_frame_raises_its_error(kind, exc):
    with pytest.raises(exc) as info:
        SignedCodec(SECRET).decode_bytes(bad_frame(kind))
    assert info.value.reason == {"schema_version": "version"}.get(kind, kind)
    assert info.value.recoverable == (kind in ("schema", "schema_version"))


def test_tampered_and_truncated_whole_frames():
    codec = SignedCodec(SECRET)
    frame = bytearray(codec.encode_bytes(Done("r", 3)))
    with pytest.raises(TruncatedFrame):
        codec.decode_bytes(bytes(frame[:-5]))
    with pytest.raises(GarbageFrame):
        codec.decode_bytes(bytes(frame) + b"x")
    for offset in (10, wire.PREFIX_SIZE + 3, wire.SIGNED_PREFIX_SIZE + 1, len(frame) - 1):  # prefix..tag3
        tampered = bytearray(frame)
        tampered[offset] ^= 1
        with pytest.raises(BadMAC):
            codec.decode_bytes(bytes(tampered))


def test_schema_violations():
    codec = SignedCodec(SECRET)
    enc = msgspec.msgpack.encode

    def signed(obj):
        return b"".join(
            bytes(p) for p in codec.frames.encode(enc(obj), b"", schema_version=wire.KV_SCHEMA.version)
        )

    chunk = {
        "type": "kv_chunk",
        "request_id": "r",
        "seq": 0,
        "first_layer": 0,
        "num_layers": 1,
        "tensor": ["float16", [1, 2, 1, 4]],
    }
    bad = [
        {**chunk, "block_ids": [-1]},
        {**chunk, "block_ids": ["x"]},
        {**chunk, "block_ids": [1], "extra": 1},
        {"type": "reserve", "request_id": "r", "num_tokens": 4},  # gone with the one round trip
        {"type": "no_such_message"},
        {
            "type": "kv_chunk",
            "request_id": "r",
            "seq": 0,
            "first_layer": 0,
            "num_layers": 2,
            "block_ids": [1],
            "tensor": ["float16", [1, 2, 1, 4]],
        },
        {
            "type": "kv_chunk",
            "request_id": "r",
            "seq": 0,
            "first_layer": 0,
            "num_layers": 1,
            "block_ids": [1],
            "tensor": ["complex128", [1, 2, 1, 4]],
        },
        [1, 2, 3],
    ]
    for obj in bad:
        with pytest.raises(SchemaError):
            codec.decode_bytes(signed(obj))


def test_limits_checked_before_reading():
    small = SignedCodec(SECRET, max_body=16)
    with pytest.raises(FrameTooLarge):
        small.encode(Heartbeat("e", 0.0), b"x" * 17)
    with pytest.raises(FrameTooLarge):
        small.decode_bytes(SignedCodec(SECRET).encode_bytes(Heartbeat("e", 0.0), b"x" * 17))


def test_layout_mismatch_names_the_fields():
    ours = handshake()
    assert ours.layout_mismatch(handshake(engine_id="other", role="kv_consumer")) == ""
    diff = ours.layout_mismatch(handshake(num_kv_heads=4, dtype="float16"))
    assert "num_kv_heads: ours 8, peer 4" in diff and "dtype" in diff


def test_layer_windows_must_agree_and_none_given_means_full_attention():
    """A peer from before windows were shipped sends no layer_windows: that is every layer in full, so it
    agrees with a full-attention model's explicit zeros and disagrees with a sliding one."""
    full, sliding = handshake(layer_windows=[0] * 32), handshake(layer_windows=[4096, 0] * 16)
    old_peer = handshake()
    assert full.layout_mismatch(old_peer) == "" and old_peer.layout_mismatch(full) == ""
    assert "layer_windows" in sliding.layout_mismatch(old_peer)
    assert "layer_windows" in sliding.layout_mismatch(handshake(layer_windows=[2048, 0] * 16))


def test_secret_resolution(monkeypatch, caplog):
    monkeypatch.setenv(wire.SECRET_ENV, "from-env")
    assert wire.resolve_secret(None) == b"from-env"
    assert wire.resolve_secret("flag") == b"flag"
    monkeypatch.delenv(wire.SECRET_ENV)
    with caplog.at_level(logging.WARNING):
        assert wire.resolve_secret(None) == wire._DEV_SECRET
    assert "development secret" in caplog.text


def test_listener_refuses_bad_frames_logs_once_per_reason_and_keeps_accepting(caplog):
    """Each stranger is refused and its connection closed (a frame outside the session cannot be skipped
    safely); the listener logs once per peer and reason, and a real link still works."""
    from pdserve.kvconnector.link import connect
    from tests.harness.bad_frames import stranger_hello

    got, drops = [], []
    listener = Listener(
        "127.0.0.1",
        0,
        SignedCodec(SECRET),
        lambda link, msg, body: got.append(msg),
        on_drop=lambda link, reason: drops.append(reason),
    )
    try:
        assert listener.address[0] == "127.0.0.1"
        with caplog.at_level(logging.WARNING, logger="pdserve.kvconnector.link"):
            for _ in range(3):
                with socket.create_connection(listener.address) as s:
                    s.sendall(stranger_hello() + bad_frame("hmac"))
                    assert s.recv(4096)  # our hello
                    s.settimeout(5)
                    assert _closed(s)
            link = connect(listener.address, SignedCodec(SECRET), lambda *a: None)
            link.send(Heartbeat("ok", 1.0))
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)
            link.close()
        assert got == [Heartbeat("ok", 1.0)] and drops == ["hmac"] * 3
        assert caplog.text.count("dropped a frame (hmac)") == 3  # once per peer
    finally:
        listener.close()


def _closed(s: socket.socket) -> bool:
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True


def test_torch_free_modules_stay_torch_free():
    code = (
        "import sys, pdserve.kvconnector, pdserve.wire.frames, pdserve.kvconnector.link, "
        "pdserve.kvconnector.scheduler_side, pdserve.kvconnector.metrics, pdserve.wire.kv_events, "
        "pdserve.wire.hashing; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "node-7.cluster.local"])
def test_the_public_dev_secret_is_refused_off_loopback(monkeypatch, host):
    monkeypatch.delenv(wire.SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match="needs a frame-signing secret"):
        wire.resolve_secret(None, host)
    assert wire.resolve_secret("given", host) == b"given"
    assert wire.resolve_secret(None, "localhost") == wire._DEV_SECRET
