"""The RPC messages the nodes speak, re-exported from their owner, `kvconnector/node_messages.py` (torch-free).

proxy -> node: Generate, Abort; node -> proxy: Tokens, Error; decode -> prefill: Prefill, Abort;
prefill -> decode: FirstToken, Error, PrefillDone. Frames are wire.py's signed frames (`make_codec(secret)`).
"""

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "TOPIC_HEARTBEAT",
    "TOPIC_KV_EVENTS",
    "Abort",
    "Error",
    "FirstToken",
    "Generate",
    "NodeHeartbeat",
    "Prefill",
    "PrefillDone",
    "Tokens",
    "encode_heartbeat",
    "make_codec",
    "plain",
]

from kvconnector.node_messages import (  # noqa: E402
    HEARTBEAT_INTERVAL_S,
    TOPIC_HEARTBEAT,
    TOPIC_KV_EVENTS,
    Abort,
    Error,
    FirstToken,
    Generate,
    NodeHeartbeat,
    Prefill,
    PrefillDone,
    Tokens,
    encode_heartbeat,
    make_codec,
    plain,
)
