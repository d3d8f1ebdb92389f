"""Malformed frames of each kind the wire layer must drop (torch-free)."""

import hashlib
import hmac
import os

from pdserve.kvconnector.link import HELLO, HELLO_MAGIC
from pdserve.wire.frames import FRAME_VERSION, MAGIC, PREFIX, Heartbeat, KVChunk, SignedCodec, TensorMeta

GOOD_SECRET = b"test-secret"


def signed_prefix(secret: bytes, hlen: int, blen: int, version: int = FRAME_VERSION, seq: int = 0) -> bytes:
    """A frame prefix with a valid tag1 under secret (no session key: what a whole-frame decoder checks)."""
    prefix = PREFIX.pack(MAGIC, version, 0, 1, hlen, blen, seq)
    return prefix + hmac.new(secret, b"\x00\x00" + prefix, hashlib.sha256).digest()


def stranger_hello() -> bytes:
    """What anyone may send to open a KV link: the hello carries no secret."""
    return HELLO.pack(HELLO_MAGIC, FRAME_VERSION, os.urandom(32))


def bad_frame(kind: str, secret: bytes = GOOD_SECRET) -> bytes:
    good = SignedCodec(secret)
    if kind == "garbage":
        return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(40))
    if kind == "version":
        return PREFIX.pack(MAGIC, FRAME_VERSION + 7, 0, 1, 10, 0, 0) + b"\x00" * 80
    if kind == "oversized":  # signed, but past the limits
        return signed_prefix(secret, 10, 1 << 50)
    if kind == "truncated":  # a prefix that promises more than the sender will ever send, then EOF
        return signed_prefix(secret, 100, 0) + b"\x81"
    if kind == "hmac":
        return SignedCodec(b"wrong-secret").encode_bytes(Heartbeat(engine_id="evil", ts=0.0))
    if kind == "schema":  # correctly signed, but a layer index must be >= 0
        return good.encode_bytes(
            KVChunk(
                request_id="evil",
                seq=0,
                first_layer=-1,
                num_layers=1,
                block_ids=[0],
                tensor=TensorMeta("float16", [1, 2, 1, 4]),
            )
        )
    if kind == "schema_version":
        frame = good.encode(Heartbeat(engine_id="x", ts=0.0))
        return b"".join(SignedCodec(secret).frames.encode(frame[2], b"", schema_version=99))
    raise ValueError(kind)
