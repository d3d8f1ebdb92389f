"""Proxy <-> node and decode <-> prefill control messages (torch-free), on top of frames.py's signed frames.

Sockets. Every rpc frame is frames.py's signed frame (magic, versions, msgpack header, HMAC-SHA256 with the
shared --kv-secret) carrying one of the tagged maps below, one ZMQ message part per frame
(`make_codec(secret)`).
- Each node binds a ZMQ ROUTER "rpc" socket. A proxy connects one DEALER per node, identity = the proxy id; a
  decode node driving a prefill node does the same with its node id. A DEALER sends the frame as one part (an
  empty delimiter part before it, REQ style, is tolerated); the node answers [identity, frame]. Readers take
  the last part.
- Each node binds a ZMQ PUB "events" socket and publishes multipart [topic, seq (8 bytes big-endian, per
  topic), payload]:
      b"kv-events"  payload = vLLM-format KVEventBatch (wire.kv_events), plain msgpack so other indexers read
                    it
      b"heartbeat"  payload = plain msgpack map, `NodeHeartbeat` below, every HEARTBEAT_INTERVAL_S
  A reader takes the first part as topic and the last as payload. A seq that goes backwards means the node
  restarted (its cache is empty).

Flow (docs/architecture.md, "A request's way"):
    proxy  -> node      Generate (to the decode node; to any node in colocated mode), Abort
    node   -> proxy     Tokens (a stream; the last has finished=True and timings), Error
    decode -> prefill   Prefill, Abort
    prefill -> decode   FirstToken, Error, PrefillDone (the KV transfer ended, ok or not)
    either -> next hop  PromptLogprobs (params.prompt_logprobs set), in pieces, just before the first token
An Abort ends the request everywhere and frees its blocks; the node answers it with a final
Tokens(finished=True, finish_reason="abort"). `Error.retryable` means nothing was streamed and another node
may succeed (the prefill node died before the first token, a queue was full): the proxy re-sends elsewhere.

Field conventions:
- `params` is `SamplingParams.to_dict()`; the node rebuilds it with `SamplingParams.from_dict()`, which
  validates.
- `deadline_s` is a budget in seconds from receipt (two machines' clocks are never compared); 0 = none.
- `logprobs`, per generated token: [top_ids, top_logprobs, sampled_logprob, sampled_rank] (rank 1 = most
  likely); `logprob_entry()` reads one. Prompt logprobs use the same record per prompt token (its own
  logprob and rank in place of the sampled token's); the first prompt token has none.
- `timings` (final Tokens): seconds, keys TIMING_KEYS; a missing key is 0.
- `finish_reason`: "stop" (EOS or a stop token), "length" (max_tokens or the context is full), "abort".
  Stop *strings* are the proxy's: it detokenizes, cuts the text and sends Abort.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple, Optional

import msgpack
import msgspec

from pdserve.wire.frames import Message, Schema, SignedCodec

SCHEMA_VERSION = 1
TOPIC_KV_EVENTS = b"kv-events"
TOPIC_HEARTBEAT = b"heartbeat"
HEARTBEAT_INTERVAL_S = 0.5
MODES = ("colocated", "disaggregated")
FINISH_REASONS = ("stop", "length", "abort")
TIMING_KEYS = ("prefill_queue", "prefill", "transfer", "exposed_transfer", "decode_queue")
MAX_PROMPT_TOKENS = 1 << 20


class NodeRole(str, enum.Enum):
    """What a node serves, as heartbeats, /health, metrics labels and `pdserve up` name it; set by its
    kv_role."""

    PREFILL = "prefill"  # kv_producer
    DECODE = "decode"  # kv_consumer
    BOTH = "both"  # kv_both: colocated requests, and either side of a disaggregated one

    def __str__(self) -> str:
        return self.value

    @classmethod
    def of_kv_role(cls, kv_role: str) -> "NodeRole":
        return {"kv_producer": cls.PREFILL, "kv_consumer": cls.DECODE, "kv_both": cls.BOTH}[kv_role]

    @property
    def prefills(self) -> bool:
        return self in (NodeRole.PREFILL, NodeRole.BOTH)

    @property
    def decodes(self) -> bool:
        return self in (NodeRole.DECODE, NodeRole.BOTH)


ROLES = tuple(role.value for role in NodeRole)
MAX_ID_LEN = 256
MAX_KV_PEERS = 1024


def _check_request(request_id: str, prompt_token_ids: Optional[list[int]] = None) -> None:
    if not 0 < len(request_id) <= MAX_ID_LEN:
        raise ValueError(f"request_id must be 1..{MAX_ID_LEN} characters")
    if prompt_token_ids is not None and (
        not 0 < len(prompt_token_ids) <= MAX_PROMPT_TOKENS or min(prompt_token_ids) < 0
    ):
        raise ValueError("prompt_token_ids must be a non-empty list of non-negative ids")


# ------------------------------------------------------------------------------------------ proxy <-> node


class Generate(Message, tag="generate"):
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams.to_dict()
    mode: str = "colocated"  # colocated | disaggregated
    prefill_rpc: str = (
        ""  # disaggregated: the prefill node's rpc endpoint (tcp://host:port) the decode node drives
    )
    deadline_s: float = 0.0  # seconds from arrival; 0 = none

    def check(self) -> None:
        _check_request(self.request_id, self.prompt_token_ids)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "disaggregated" and not self.prefill_rpc:
            raise ValueError("disaggregated mode needs prefill_rpc")
        if self.deadline_s < 0:
            raise ValueError("deadline_s must be >= 0")


class Abort(Message, tag="abort"):
    request_id: str
    reason: str = ""

    def check(self) -> None:
        _check_request(self.request_id)


class Tokens(Message, tag="tokens"):
    request_id: str
    token_ids: list[int]
    logprobs: Optional[list[Any]] = None  # per token: [top_ids, top_logprobs, sampled_logprob, sampled_rank]
    finished: bool = False
    finish_reason: Optional[str] = None
    num_cached_tokens: int = 0  # prompt tokens found in cache on the node that prefilled
    timings: Optional[dict[str, float]] = None  # on the final message; keys TIMING_KEYS

    def check(self) -> None:
        _check_request(self.request_id)
        if self.token_ids and min(self.token_ids) < 0:
            raise ValueError("negative token id")
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError("logprobs must hold one entry per token id")
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if self.num_cached_tokens < 0:
            raise ValueError("negative num_cached_tokens")


class Error(Message, tag="error"):
    request_id: str
    status: int  # 400 bad request, 429 queue full / no blocks, 503 cannot serve, 504 timeout
    message: str
    retryable: bool = False
    node_draining: bool = False  # the sender is shutting down: route this and later requests elsewhere

    def check(self) -> None:
        _check_request(self.request_id)
        if not 400 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an error status")


# ----------------------------------------------------------------------------------------- decode <-> prefill


class Prefill(Message, tag="prefill"):
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    kv_endpoint: str  # the decode node's KV listener, host:port
    block_ids: list[int]  # the decode node's blocks for prompt blocks num_cached_blocks..
    num_cached_blocks: int  # prompt blocks the decode node already holds (its prefix hits)
    # The id this request's KV frames (chunks, Done, Abort) carry: request_id plus a random part that only
    # this prefill node is told, so no other producer on the decode node's KV listener, authenticated or
    # not, can write into or end the request
    kv_request_id: str
    decode_node_id: str = ""

    def check(self) -> None:
        _check_request(self.request_id, self.prompt_token_ids)
        if self.num_cached_blocks < 0 or any(b < 0 for b in self.block_ids):
            raise ValueError("negative block id or cached count")
        if not self.kv_request_id.startswith(self.request_id) or len(self.kv_request_id) > 2 * MAX_ID_LEN:
            raise ValueError("kv_request_id must extend request_id")


class FirstToken(Message, tag="first_token"):
    request_id: str
    token: int
    logprobs: Optional[Any] = None  # one [top_ids, top_logprobs, sampled_logprob, sampled_rank] entry
    num_cached_tokens: int = 0
    timings: Optional[dict[str, float]] = None

    def check(self) -> None:
        _check_request(self.request_id)
        if self.token < 0 or self.num_cached_tokens < 0:
            raise ValueError("negative token id or cached count")


class KVPeers(Message, tag="kv_peers"):
    """Proxy -> prefill node: decode nodes' KV listeners (host:port) it may soon write to. The prefill node
    opens its KV links to them now, so no request pays the handshake (and, on cuda_ipc, the mapping of the
    peer's cache) on its way to the first token."""

    endpoints: list[str]

    def check(self) -> None:
        if len(self.endpoints) > MAX_KV_PEERS or any(not 0 < len(e) <= MAX_ID_LEN for e in self.endpoints):
            raise ValueError(f"kv_peers: at most {MAX_KV_PEERS} endpoints of 1..{MAX_ID_LEN} characters")


class PrefillDone(Message, tag="prefill_done"):
    """Prefill -> decode: the KV transfer ended (ok or not); D learns P's view of a failure quickly."""

    request_id: str
    ok: bool
    cause: str = ""
    timings: Optional[dict[str, float]] = None


class PromptLogprobs(Message, tag="prompt_logprobs"):
    """Node -> proxy (and prefill -> decode, which relays it): a run of a prompt's logprob records, sent by
    the node that prefilled, all before the request's first token. Pieces, because a long prompt's records
    would not fit one frame (DEFAULT_MAX_HEADER); `prompt_logprob_pieces` cuts them."""

    request_id: str
    start: int  # prompt position of entries[0]; position 0 has no record, so >= 1
    entries: list[Any]  # per prompt token: [top_ids, top_logprobs, logprob, rank]

    def check(self) -> None:
        _check_request(self.request_id)
        if not 1 <= self.start <= MAX_PROMPT_TOKENS or self.start + len(self.entries) > MAX_PROMPT_TOKENS:
            raise ValueError("prompt logprobs start must be in 1..MAX_PROMPT_TOKENS")


NODE_SCHEMA = Schema(
    "node",
    SCHEMA_VERSION,
    [Generate, Abort, Tokens, Error, Prefill, FirstToken, PrefillDone, KVPeers, PromptLogprobs],
)
PROMPT_LOGPROBS_PIECE_BYTES = 256 * 1024  # well under DEFAULT_MAX_HEADER, whatever the entries' widths


def prompt_logprob_pieces(request_id: str, entries: list) -> list[PromptLogprobs]:
    """A prompt's records (entries[0], the first token's, is None and not sent) as messages under
    PROMPT_LOGPROBS_PIECE_BYTES each. Sizes are estimated, not measured: 16 bytes per (id, logprob) pair
    bounds msgpack's int32 + float64, so no piece can outgrow the frame limit."""
    pieces: list[PromptLogprobs] = []
    start, size = 1, 0
    for i in range(1, len(entries)):
        cost = 32 + 16 * len(entries[i][0])
        if size and size + cost > PROMPT_LOGPROBS_PIECE_BYTES:
            pieces.append(PromptLogprobs(request_id=request_id, start=start, entries=plain(entries[start:i])))
            start, size = i, 0
        size += cost
    if start < len(entries):
        pieces.append(PromptLogprobs(request_id=request_id, start=start, entries=plain(entries[start:])))
    return pieces


def make_codec(secret: bytes) -> SignedCodec:
    """Control frames only: a body is never expected, so any is refused before it is read."""
    return SignedCodec(secret, NODE_SCHEMA, max_body=0)


def plain(value: Any) -> Any:
    """Tuples -> lists, recursively, so logprob records travel as msgpack arrays."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


class LogprobEntry(NamedTuple):
    top_ids: list[int]
    top_logprobs: list[float]
    logprob: float
    rank: int


def logprob_entry(raw: Any) -> LogprobEntry:
    """One token's logprob record as a node sends it; ValueError when it is not [ids, lps, float, int]."""
    try:
        top_ids, top_lps, lp, rank = raw
        entry = LogprobEntry([int(i) for i in top_ids], [float(x) for x in top_lps], float(lp), int(rank))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed logprob entry {raw!r}: {exc}") from None
    if len(entry.top_ids) != len(entry.top_logprobs):
        raise ValueError("top_ids and top_logprobs differ in length")
    return entry


# ------------------------------------------------------------------------------------------ events socket


class NodeHeartbeat(msgspec.Struct, forbid_unknown_fields=False):
    """A node's liveness and load, published on its events socket (unknown keys are ignored: newer nodes)."""

    node_id: str
    role: str  # prefill | decode | both
    rpc: str  # tcp://host:port of the ROUTER socket
    http: str  # http://host:port serving /health and /metrics
    num_waiting: int
    num_running: int
    free_blocks: int  # free + evictable cached blocks
    total_blocks: int
    block_size: int
    ts: float  # the node's wall clock, informational; liveness uses the receiver's clock
    draining: bool = False  # SIGTERM: finishing what it holds, admitting nothing new; never route to it
    kv: str = ""  # host:port of the node's KV listener when it receives KV (decode, both); "" otherwise
    # Random per node process: another value under the same node_id is a restarted process, which holds
    # none of the requests the old one held ("" from nodes that predate it: never compared)
    incarnation: str = ""

    def check(self) -> None:
        if not 0 < len(self.node_id) <= MAX_ID_LEN:
            raise ValueError("node_id must be 1..256 characters")
        if len(self.incarnation) > MAX_ID_LEN:
            raise ValueError("incarnation must be at most 256 characters")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if min(self.num_waiting, self.num_running, self.free_blocks, self.total_blocks) < 0:
            raise ValueError("negative load figure")
        if self.block_size < 1:
            raise ValueError("block_size must be positive")


_hb_decoder = msgspec.msgpack.Decoder(NodeHeartbeat)


def encode_heartbeat(hb: NodeHeartbeat) -> bytes:
    return msgpack.packb(msgspec.structs.asdict(hb), use_bin_type=True)


def decode_heartbeat(payload: bytes) -> NodeHeartbeat:
    """Decode and check one heartbeat; ValueError on anything malformed."""
    try:
        hb = _hb_decoder.decode(payload)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ValueError(f"malformed heartbeat: {exc}") from None
    hb.check()
    return hb
