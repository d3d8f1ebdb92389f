"""Signed, versioned msgpack frames and the KV-transfer message schemas (torch-free).

Two layers, so other links (proxy <-> node) reuse the first with their own schemas:

1. `FrameCodec`: one frame is
       prefix  !4sBBHIQQ  magic b"PDSV", frame version, flags, schema version, header length, body length,
                          sequence number  (28 bytes, fixed)
       tag1    HMAC-SHA256(key, context + prefix)                   (32 bytes)
       header  msgpack map (a msgspec Struct tagged by "type")
       tag2    HMAC-SHA256(key, context + prefix + header)          (32 bytes)
       body    raw bytes (a tensor's bytes; dtype and shape travel in the header), possibly empty
       tag3    HMAC-SHA256(key, context + prefix + header + body)   (32 bytes)
   A stream reader reads the fixed 60 bytes, checks tag1, and only then trusts the lengths: a peer without the
   key makes it allocate nothing (a 36-byte prefix declaring a 4 GiB body used to be allocated and zeroed
   before the MAC was checked). The header is read within its limit and decoded only after tag2; the body's
   size must then be what that message type allows (`body_limit`) and is read in bounded chunks before tag3 is
   checked. Nothing is unpickled.
   Replay: the sequence number is inside every tag. A KV link (kvconnector/link.py) signs with per-session
   keys derived from a nonce from each side, and wants sequence numbers 0, 1, 2, ... in order, so a frame
   replayed or reordered on that link, or a captured handshake replayed on a new one, fails. ZMQ sockets (node
   RPC) put the sender's identity in `context` and use `wire.replay.ReplayGuard`: time-based sequence numbers,
   strictly increasing per sender, within a window of the receiver's clock.
2. `Schema`: a set of msgspec Struct types (tagged unions) with a schema version; decoding validates types and
   ranges and raises `SchemaError` on violation.

Every failure is a `WireError` subclass with a `reason` string that metrics count by (`truncated`, `version`,
`oversized`, `hmac`, `schema`, `garbage`, `replay`). `recoverable` says whether a stream can go on after it: a
schema violation in an authenticated frame leaves the stream intact; anything else (a bad tag, a bad magic, a
wrong frame version, an oversized length, a truncated frame, a replay) does not, so a stream reader closes
that connection (the node keeps serving the others).

The shared secret: `--kv-secret`, else env `PDSERVE_KV_SECRET`, else a fixed development secret with a
warning. Confidentiality: frames are authenticated, not encrypted. Prompt token ids (Generate, Prefill,
Reserve's block hashes) and KV bytes travel in clear; run the node network on a trusted segment.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence, Union

import msgspec

from pdserve.wire.bind import is_loopback

log = logging.getLogger(__name__)

MAGIC = b"PDSV"
FRAME_VERSION = 2
PREFIX = struct.Struct("!4sBBHIQQ")
PREFIX_SIZE = PREFIX.size  # 28
MAC_SIZE = 32
SIGNED_PREFIX_SIZE = PREFIX_SIZE + MAC_SIZE  # what a stream reader reads before it trusts anything
DEFAULT_MAX_HEADER = 1 << 20  # 1 MiB of msgpack is far more than any control message needs
DEFAULT_MAX_BODY = 4 << 30  # one contiguous KV chunk; 8192 tokens of Llama-8B KV is 1 GiB
SECRET_ENV = "PDSERVE_KV_SECRET"
_DEV_SECRET = b"pdserve-dev-secret-do-not-use-in-production"


# ---------------------------------------------------------------------------------------------------- errors


class WireError(Exception):
    reason = "garbage"
    recoverable = False


class TruncatedFrame(WireError):
    reason = "truncated"


class VersionMismatch(WireError):
    reason = "version"


class FrameTooLarge(WireError):
    reason = "oversized"


class BadMAC(WireError):
    reason = "hmac"


class SchemaError(WireError):
    reason = "schema"
    recoverable = True


class GarbageFrame(WireError):
    reason = "garbage"


class ReplayedFrame(WireError):
    reason = "replay"


# Every `reason` a dropped frame is counted under: the metrics set each to 0 at start-up, so a dashboard shows
# 0 drops, not "no data", on a healthy cluster.
DROP_REASONS = tuple(dict.fromkeys(e.reason for e in (WireError, *WireError.__subclasses__())))


class LayoutMismatch(Exception):
    """A peer's KV layout (model, dtype, block size, layers, heads, head dim, hash) differs from ours."""


def resolve_secret(secret: str | bytes | None = None, bind_host: str = "127.0.0.1") -> bytes:
    """--kv-secret, else $PDSERVE_KV_SECRET, else the development secret - on loopback only: it is in the
    source, so anyone who can reach a socket signed with it can send it frames."""
    if secret is None:
        secret = os.environ.get(SECRET_ENV)
    if not secret:
        if not is_loopback(bind_host):
            raise ValueError(
                f"binding {bind_host} needs a frame-signing secret: pass --kv-secret or set "
                f"${SECRET_ENV} (the same on every process)"
            )
        log.warning(
            "no --kv-secret or $%s given: KV frames are signed with the public development secret "
            "(loopback only)",
            SECRET_ENV,
        )
        return _DEV_SECRET
    return secret.encode() if isinstance(secret, str) else bytes(secret)


# ---------------------------------------------------------------------------------------------------- frames


@dataclass(slots=True)
class FramePrefix:
    flags: int
    schema_version: int
    header_len: int
    body_len: int
    seq: int = 0


def _context(context: bytes) -> bytes:
    return struct.pack("!H", len(context)) + context  # length-prefixed: no two contexts read the same


class FrameCodec:
    """Builds and checks frames. `encode` returns buffers for a gather write so a large body is never
    copied."""

    def __init__(self, secret: bytes, max_header: int = DEFAULT_MAX_HEADER, max_body: int = DEFAULT_MAX_BODY):
        self._secret = secret
        self.max_header = max_header
        self.max_body = max_body
        self._last_seq = 0
        self._seq_lock = threading.Lock()  # several threads sign frames with one codec

    def derive(self, label: bytes, *parts: bytes) -> bytes:
        """A key for one purpose (a link session, one direction) from the shared secret."""
        mac = hmac.new(self._secret, _context(label), hashlib.sha256)
        for p in parts:
            mac.update(_context(p))
        return mac.digest()

    def next_seq(self) -> int:
        """A time-based, strictly increasing sequence number (ns): a restarted sender still counts upward."""
        with self._seq_lock:
            self._last_seq = max(time.time_ns(), self._last_seq + 1)
            return self._last_seq

    def encode(
        self,
        header: bytes,
        body: Any = b"",
        schema_version: int = 0,
        flags: int = 0,
        seq: int | None = None,
        key: bytes | None = None,
        context: bytes = b"",
    ) -> list:
        """-> [prefix, tag1, header, tag2, body?, tag3]; body is anything exposing the buffer protocol."""
        body = memoryview(body).cast("B") if not isinstance(body, (bytes, bytearray)) else body
        if len(header) > self.max_header or len(body) > self.max_body:
            raise FrameTooLarge(
                f"frame of {len(header)}+{len(body)} bytes exceeds the limits "
                f"({self.max_header}, {self.max_body})"
            )
        seq = self.next_seq() if seq is None else seq
        prefix = PREFIX.pack(MAGIC, FRAME_VERSION, flags, schema_version, len(header), len(body), seq)
        mac = hmac.new(key or self._secret, _context(context), hashlib.sha256)
        mac.update(prefix)
        tag1 = mac.copy().digest()
        mac.update(header)
        tag2 = mac.copy().digest()
        if len(body):
            mac.update(body)
            return [prefix, tag1, header, tag2, body, mac.digest()]
        return [prefix, tag1, header, tag2, mac.digest()]

    def open_prefix(
        self, signed_prefix: bytes, key: bytes | None = None, context: bytes = b""
    ) -> tuple[FramePrefix, "hmac.HMAC"]:
        """Check the fixed-size signed prefix (tag1) before any length in it is believed."""
        if len(signed_prefix) < SIGNED_PREFIX_SIZE:
            raise TruncatedFrame(
                f"signed frame prefix of {len(signed_prefix)} bytes, need {SIGNED_PREFIX_SIZE}"
            )
        prefix, tag1 = (
            bytes(signed_prefix[:PREFIX_SIZE]),
            bytes(signed_prefix[PREFIX_SIZE:SIGNED_PREFIX_SIZE]),
        )
        magic, version, flags, schema_version, hlen, blen, seq = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise GarbageFrame(f"bad magic {magic!r}")
        if version != FRAME_VERSION:
            raise VersionMismatch(f"frame version {version}, this node speaks {FRAME_VERSION}")
        mac = hmac.new(key or self._secret, _context(context), hashlib.sha256)
        mac.update(prefix)
        if not hmac.compare_digest(mac.digest(), tag1):
            raise BadMAC("frame prefix MAC does not verify (wrong --kv-secret, another session, or tampered)")
        if hlen > self.max_header or blen > self.max_body:
            raise FrameTooLarge(
                f"frame declares {hlen}+{blen} bytes, limits are {self.max_header}+{self.max_body}"
            )
        return FramePrefix(flags, schema_version, hlen, blen, seq), mac

    @staticmethod
    def check_tag(mac: "hmac.HMAC", data: Any, tag: bytes, what: str) -> None:
        """Extend the running MAC by data and check tag (tag2 after the header, tag3 after the body)."""
        if len(data):
            mac.update(data)
        if len(tag) != MAC_SIZE or not hmac.compare_digest(mac.copy().digest(), bytes(tag)):
            raise BadMAC(f"frame {what} MAC does not verify (tampered)")

    def split(
        self, frame: bytes | memoryview, key: bytes | None = None, context: bytes = b""
    ) -> tuple[FramePrefix, bytes, memoryview]:
        """Check one whole frame held in memory (ZMQ messages) -> (prefix, header bytes, body view)."""
        view = memoryview(frame).cast("B")
        pre, mac = self.open_prefix(bytes(view[:SIGNED_PREFIX_SIZE]), key, context)
        h0 = SIGNED_PREFIX_SIZE
        b0 = h0 + pre.header_len + MAC_SIZE
        end = b0 + pre.body_len + MAC_SIZE
        if len(view) < end:
            raise TruncatedFrame(f"frame of {len(view)} bytes, its prefix declares {end}")
        if len(view) > end:
            raise GarbageFrame(f"{len(view) - end} trailing bytes after the frame")
        header = bytes(view[h0 : h0 + pre.header_len])
        self.check_tag(mac, header, view[b0 - MAC_SIZE : b0], "header")
        body = view[b0 : b0 + pre.body_len]
        self.check_tag(mac, body, view[end - MAC_SIZE : end], "body")
        return pre, header, body


# ---------------------------------------------------------------------------------------------------- schemas


class Schema:
    """A versioned set of tagged msgspec Structs. decode() checks the schema version, then types and
    ranges."""

    def __init__(self, name: str, version: int, types: Sequence[type]):
        self.name, self.version, self.types = name, version, tuple(types)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Union[self.types])  # type: ignore[valid-type]

    def encode(self, msg: msgspec.Struct) -> bytes:
        if not isinstance(msg, self.types):
            raise TypeError(f"{type(msg).__name__} is not part of schema {self.name}")
        return self._encoder.encode(msg)

    def decode(self, header: bytes, schema_version: int) -> msgspec.Struct:
        if schema_version != self.version:
            exc = VersionMismatch(
                f"{self.name} schema version {schema_version}, this node speaks {self.version}"
            )
            exc.recoverable = True  # the frame itself was sound: the stream can go on
            raise exc
        try:
            msg = self._decoder.decode(header)
        except msgspec.ValidationError as exc:
            raise SchemaError(f"{self.name}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise GarbageFrame(f"{self.name}: undecodable header: {exc}") from None
        check = getattr(msg, "check", None)
        if check is not None:
            try:
                check()
            except ValueError as exc:
                raise SchemaError(f"{self.name} {type(msg).__name__}: {exc}") from None
        return msg


class Message(msgspec.Struct, tag_field="type", tag=True, forbid_unknown_fields=True):
    """Base of every control message: a map tagged by "type"; unknown fields are a schema violation."""


# Non-negative ints and bounded strings, checked by msgspec on decode.
UInt = msgspec.Meta(ge=0)
Id = msgspec.Meta(min_length=1, max_length=256)

DTYPE_ITEMSIZE = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
    "int32": 4,
    "int64": 8,
}


class TensorMeta(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """How to view a raw body: dtype name (torch's, without the prefix) and shape."""

    dtype: str
    shape: list[int]

    def nbytes(self) -> int:
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        n = DTYPE_ITEMSIZE[self.dtype]
        for dim in self.shape:
            if dim < 0:
                raise ValueError(f"negative dimension in shape {self.shape}")
            n *= dim
        return n


# -------------------------------------------------------------------------------------------------- KV schema


class Handshake(Message, tag="handshake"):
    """Sent by each side first; `accept` in the answer. The layout fields must match exactly."""

    engine_id: str
    role: str  # kv_producer | kv_consumer | kv_both
    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hash_algorithm: str
    transport: str  # tcp | cuda_ipc | nixl
    # per layer: 0 full attention, else its sliding window (what is shipped); [] (a peer from before windows
    # were shipped) means every layer in full
    layer_windows: list[int] = []
    device_uuid: str = ""  # the GPU's UUID, "" on CPU: cuda_ipc maps the peer's GPU by it
    data_plane: dict[str, Any] = {}  # transport specifics: the consumer's exported cache (cuda_ipc, nixl)
    accept: bool = True
    error: str = ""

    LAYOUT = (
        "model",
        "dtype",
        "block_size",
        "num_layers",
        "num_kv_heads",
        "head_dim",
        "hash_algorithm",
        "layer_windows",
        "transport",
    )

    def check(self) -> None:
        if self.role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ValueError(f"bad role {self.role!r}")
        if min(self.block_size, self.num_layers, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError("layout dimensions must be positive")
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"unknown dtype {self.dtype!r}")

    def layout_mismatch(self, other: "Handshake") -> str:
        """'' when the KV layouts agree, else which fields differ (ours vs theirs)."""
        diffs = [
            f"{f}: ours {getattr(self, f)!r}, peer {getattr(other, f)!r}"
            for f in self.LAYOUT
            if self._layout_value(f) != other._layout_value(f)
        ]
        return "; ".join(diffs)

    def _layout_value(self, field: str):
        if field == "layer_windows":
            return list(self.layer_windows) or [0] * self.num_layers
        return getattr(self, field)


class KVChunk(Message, tag="kv_chunk"):
    """Layers [first_layer, first_layer + num_layers) of some blocks; the tensor is [num_layers, 2, n,
    *block].

    Only the tcp data plane sends it: the tensor is this frame's body."""

    request_id: str
    seq: int  # reserved (0)
    first_layer: int
    num_layers: int
    block_ids: list[int]  # the consumer's block ids
    tensor: TensorMeta

    def check(self) -> None:
        if self.seq < 0 or self.first_layer < 0 or self.num_layers < 1 or any(b < 0 for b in self.block_ids):
            raise ValueError("negative seq/layer/block id")
        shape = self.tensor.shape
        if len(shape) < 3 or shape[0] != self.num_layers or shape[1] != 2 or shape[2] != len(self.block_ids):
            raise ValueError(
                f"tensor shape {shape} does not match {self.num_layers} layers x {len(self.block_ids)} blocks"
            )
        self.tensor.nbytes()


class Done(Message, tag="done"):
    """Producer -> consumer: every write of the request has landed in the consumer's cache (nbytes in all)."""

    request_id: str
    nbytes: int = 0


class Abort(Message, tag="abort"):
    request_id: str
    reason: str = ""


class Heartbeat(Message, tag="heartbeat"):
    engine_id: str
    ts: float


KV_SCHEMA = Schema("kv", 2, [Handshake, KVChunk, Done, Abort, Heartbeat])


def body_limit(msg: msgspec.Struct) -> int:
    """How many body bytes a message of this type may carry: a KV chunk its tensor's bytes, anything else
    none."""
    if isinstance(msg, KVChunk):
        return msg.tensor.nbytes()
    return 0


class SignedCodec:
    """FrameCodec + Schema: message (+ body) <-> frame parts. The unit a link sends and receives."""

    def __init__(
        self,
        secret: bytes,
        schema: Schema = KV_SCHEMA,
        max_header: int = DEFAULT_MAX_HEADER,
        max_body: int = DEFAULT_MAX_BODY,
    ):
        self.frames = FrameCodec(secret, max_header, max_body)
        self.schema = schema

    def encode(self, msg: msgspec.Struct, body: Any = b"", **sign) -> list:
        """sign: seq, key, context (FrameCodec.encode)."""
        return self.frames.encode(self.schema.encode(msg), body, self.schema.version, **sign)

    def encode_bytes(self, msg: msgspec.Struct, body: Any = b"", **sign) -> bytes:
        return b"".join(bytes(p) for p in self.encode(msg, body, **sign))

    def decode_frame(
        self, frame: bytes | memoryview, key: bytes | None = None, context: bytes = b""
    ) -> tuple[msgspec.Struct, memoryview, int]:
        """-> (message, body, sequence number); the caller checks the sequence (ReplayGuard)."""
        pre, header, body = self.frames.split(frame, key, context)
        msg = self.schema.decode(header, pre.schema_version)
        check_body(msg, len(body))
        return msg, body, pre.seq

    def decode_bytes(
        self, frame: bytes | memoryview, key: bytes | None = None, context: bytes = b""
    ) -> tuple[msgspec.Struct, memoryview]:
        msg, body, _ = self.decode_frame(frame, key, context)
        return msg, body


def check_body(msg: msgspec.Struct, body_len: int) -> None:
    """A body only where the message type carries one, of exactly the size it declares (0: none over tcp's
    control link when the bytes travel on another data plane)."""
    if body_len and body_len != body_limit(msg):
        raise SchemaError(
            f"{type(msg).__name__} carries a {body_len}-byte body; its type allows {body_limit(msg)}"
        )
