"""How a role plugs into the node runtime: each role package registers a factory for its part of a node, and
the runtime builds the parts its kv_role needs (kv_consumer: "decode", kv_producer: "prefill", kv_both: both).

What the runtime calls on each part:
    decode part   generate(live, msg, params), release(request_id), on_prefill_message(endpoint, msg),
                  on_prefill_node_lost(endpoint), check_timeouts(now), num_pending, kv_endpoint, close()
    prefill part  handles(msg), on_message(identity, msg), abort(request_id, reason), on_unroutable(identity),
                  num_active, close()
What a part may call on the node: the public methods of node_runtime.node_server.NodeServer (take, on_output,
fail, end, reject, admit_or_reject, final_timings) and its core, loop, rpc, metrics, options, config.
"""

from __future__ import annotations

from typing import Callable

from pdserve.wire.errors import ConfigError
from pdserve.wire.node_messages import NodeRole

DECODE, PREFILL = NodeRole.DECODE.value, NodeRole.PREFILL.value  # the parts a node is built from
PARTS_BY_KV_ROLE = {"kv_consumer": (DECODE,), "kv_producer": (PREFILL,), "kv_both": (DECODE, PREFILL)}

_factories: dict[str, Callable[[object], object]] = {}


def register(part: str, factory: Callable[[object], object]) -> None:
    """factory(node) -> the part; called once per node that needs it."""
    if part not in (DECODE, PREFILL):
        raise ValueError(f"unknown node part {part!r}")
    _factories[part] = factory


def build(part: str, node) -> object:
    factory = _factories.get(part)
    if factory is None:
        raise ConfigError(
            f"this node's kv_role needs the {part} role, which is not installed (import "
            f"{part}_node.cli first)"
        )
    return factory(node)
