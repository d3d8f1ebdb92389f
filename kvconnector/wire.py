"""Signed, versioned msgpack frames and the KV-transfer message schemas (torch-free).

Two layers, so other links (proxy <-> node) reuse the first with their own schemas:

1. `FrameCodec`: one frame is
       prefix  !4sBBHIQ  magic b"PDSV", frame version, flags, schema version, header length, body length  (20 bytes)
       header  msgpack map (a msgspec Struct tagged by "type")
       body    raw bytes (a tensor's bytes; dtype and shape travel in the header), possibly empty
       mac     HMAC-SHA256(secret, prefix + header + body)  (32 bytes)
   Lengths are checked against limits before anything is read or allocated, and the MAC is checked before the
   header is decoded, so a peer without the secret cannot make us parse anything. Nothing is unpickled.
2. `Schema`: a set of msgspec Struct types (tagged unions) with a schema version; decoding validates types and
   ranges and raises `SchemaError` on violation.

Every failure is a `WireError` subclass with a `reason` string that metrics count by (`truncated`, `version`,
`oversized`, `hmac`, `schema`, `garbage`). `recoverable` says whether a stream can go on after it: a bad MAC or
a schema violation leaves the frame boundaries intact; a bad magic, a wrong frame version, an oversized length or
a truncated frame do not, so a stream reader closes that connection (the node keeps serving the others).

The shared secret: `--kv-secret`, else env `PDSERVE_KV_SECRET`, else a fixed development secret with a warning.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import msgspec

from kvconnector.bind import is_loopback

log = logging.getLogger(__name__)

MAGIC = b"PDSV"
FRAME_VERSION = 1
PREFIX = struct.Struct("!4sBBHIQ")
PREFIX_SIZE = PREFIX.size  # 20
MAC_SIZE = 32
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
    recoverable = True


class SchemaError(WireError):
    reason = "schema"
    recoverable = True


class GarbageFrame(WireError):
    reason = "garbage"


class LayoutMismatch(Exception):
    """A peer's KV layout (model, dtype, block size, layers, heads, head dim, hash) differs from ours."""


def resolve_secret(secret: str | bytes | None = None, bind_host: str = "127.0.0.1") -> bytes:
    """--kv-secret, else $PDSERVE_KV_SECRET, else the development secret - on loopback only: it is in the
    source, so anyone who can reach a socket signed with it can send it frames."""
    if secret is None:
        secret = os.environ.get(SECRET_ENV)
    if not secret:
        if not is_loopback(bind_host):
            raise ValueError(f"binding {bind_host} needs a frame-signing secret: pass --kv-secret or set "
                             f"${SECRET_ENV} (the same on every process)")
        log.warning("no --kv-secret or $%s given: KV frames are signed with the public development secret "
                    "(loopback only)", SECRET_ENV)
        return _DEV_SECRET
    return secret.encode() if isinstance(secret, str) else bytes(secret)


# ---------------------------------------------------------------------------------------------------- frames

@dataclass(slots=True)
class FramePrefix:
    flags: int
    schema_version: int
    header_len: int
    body_len: int


class FrameCodec:
    """Builds and checks frames. `encode` returns buffers for a gather write so a large body is never copied."""

    def __init__(self, secret: bytes, max_header: int = DEFAULT_MAX_HEADER, max_body: int = DEFAULT_MAX_BODY):
        self._secret = secret
        self.max_header = max_header
        self.max_body = max_body

    def _mac(self, parts: Iterable) -> hmac.HMAC:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for p in parts:
            mac.update(p)
        return mac

    def encode(self, header: bytes, body: Any = b"", schema_version: int = 0, flags: int = 0) -> list:
        """-> [prefix, header, body?, mac]; body is anything exposing the buffer protocol (bytes, memoryview)."""
        body = memoryview(body).cast("B") if not isinstance(body, (bytes, bytearray)) else body
        if len(header) > self.max_header or len(body) > self.max_body:
            raise FrameTooLarge(f"frame of {len(header)}+{len(body)} bytes exceeds the limits "
                                f"({self.max_header}, {self.max_body})")
        prefix = PREFIX.pack(MAGIC, FRAME_VERSION, flags, schema_version, len(header), len(body))
        parts = [prefix, header, body] if len(body) else [prefix, header]
        return parts + [self._mac(parts).digest()]

    def decode_prefix(self, prefix: bytes) -> FramePrefix:
        if len(prefix) < PREFIX_SIZE:
            raise TruncatedFrame(f"frame prefix of {len(prefix)} bytes, need {PREFIX_SIZE}")
        magic, version, flags, schema_version, hlen, blen = PREFIX.unpack_from(prefix)
        if magic != MAGIC:
            raise GarbageFrame(f"bad magic {magic!r}")
        if version != FRAME_VERSION:
            raise VersionMismatch(f"frame version {version}, this node speaks {FRAME_VERSION}")
        if hlen > self.max_header or blen > self.max_body:
            raise FrameTooLarge(f"frame declares {hlen}+{blen} bytes, limits are {self.max_header}+{self.max_body}")
        return FramePrefix(flags, schema_version, hlen, blen)

    def verify(self, prefix: bytes, header: bytes, body: Any, mac: bytes) -> None:
        parts = [prefix, header, body] if len(body) else [prefix, header]
        if len(mac) != MAC_SIZE or not hmac.compare_digest(self._mac(parts).digest(), mac):
            raise BadMAC("frame MAC does not verify (wrong --kv-secret, or tampered)")

    def split(self, frame: bytes | memoryview) -> tuple[FramePrefix, bytes, memoryview]:
        """Check one whole frame held in memory (ZMQ, UCX messages) -> (prefix, header bytes, body view)."""
        view = memoryview(frame).cast("B")
        pre = self.decode_prefix(bytes(view[:PREFIX_SIZE]))
        end = PREFIX_SIZE + pre.header_len + pre.body_len
        if len(view) < end + MAC_SIZE:
            raise TruncatedFrame(f"frame of {len(view)} bytes, header declares {end + MAC_SIZE}")
        if len(view) > end + MAC_SIZE:
            raise GarbageFrame(f"{len(view) - end - MAC_SIZE} trailing bytes after the frame")
        header = bytes(view[PREFIX_SIZE:PREFIX_SIZE + pre.header_len])
        body = view[PREFIX_SIZE + pre.header_len:end]
        self.verify(bytes(view[:PREFIX_SIZE]), header, body, bytes(view[end:]))
        return pre, header, body


# ---------------------------------------------------------------------------------------------------- schemas

class Schema:
    """A versioned set of tagged msgspec Structs. decode() checks the schema version, then types and ranges."""

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
            exc = VersionMismatch(f"{self.name} schema version {schema_version}, this node speaks {self.version}")
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

DTYPE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
                  "uint8": 1, "int8": 1, "int32": 4, "int64": 8}


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


# ---------------------------------------------------------------------------------------------------- KV schema

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
    transport: str  # tcp | cuda_ipc
    device_uuid: str = ""  # the GPU's UUID, "" on CPU: cuda_ipc maps the peer's GPU by it
    data_plane: dict[str, Any] = {}  # transport specifics: the consumer's exported cache (cuda_ipc)
    accept: bool = True
    error: str = ""

    LAYOUT = ("model", "dtype", "block_size", "num_layers", "num_kv_heads", "head_dim", "hash_algorithm",
              "transport")

    def check(self) -> None:
        if self.role not in ("kv_producer", "kv_consumer", "kv_both"):
            raise ValueError(f"bad role {self.role!r}")
        if min(self.block_size, self.num_layers, self.num_kv_heads, self.head_dim) < 1:
            raise ValueError("layout dimensions must be positive")
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"unknown dtype {self.dtype!r}")

    def layout_mismatch(self, other: "Handshake") -> str:
        """'' when the KV layouts agree, else which fields differ (ours vs theirs)."""
        diffs = [f"{f}: ours {getattr(self, f)!r}, peer {getattr(other, f)!r}" for f in self.LAYOUT
                 if getattr(self, f) != getattr(other, f)]
        return "; ".join(diffs)


class KVChunk(Message, tag="kv_chunk"):
    """Layers [first_layer, first_layer + num_layers) of some blocks; the tensor is [num_layers, 2, n, *block].

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
            raise ValueError(f"tensor shape {shape} does not match {self.num_layers} layers x "
                             f"{len(self.block_ids)} blocks")
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


class SignedCodec:
    """FrameCodec + Schema: message (+ body) <-> frame parts. The unit a link sends and receives."""

    def __init__(self, secret: bytes, schema: Schema = KV_SCHEMA, max_header: int = DEFAULT_MAX_HEADER,
                 max_body: int = DEFAULT_MAX_BODY):
        self.frames = FrameCodec(secret, max_header, max_body)
        self.schema = schema

    def encode(self, msg: msgspec.Struct, body: Any = b"") -> list:
        return self.frames.encode(self.schema.encode(msg), body, self.schema.version)

    def encode_bytes(self, msg: msgspec.Struct, body: Any = b"") -> bytes:
        return b"".join(bytes(p) for p in self.encode(msg, body))

    def decode_bytes(self, frame: bytes | memoryview) -> tuple[msgspec.Struct, memoryview]:
        pre, header, body = self.frames.split(frame)
        return self.schema.decode(header, pre.schema_version), body
