"""`pdserve decode`: a decode node (kv_consumer by default; kv_both also prefills by itself)."""

from __future__ import annotations

from pdserve.node_runtime import roles


def _decode_part(node):
    from pdserve.decode_node.disagg import DisaggDecoder

    return DisaggDecoder(node)


roles.register(roles.DECODE, _decode_part)


def register_cli(subparsers) -> None:
    from pdserve.node_runtime.node_cli import register_role

    register_role(
        subparsers,
        "decode",
        "run a decode node (receives KV, continuous batching, streams tokens)",
        default_role="kv_consumer",
    )
