"""`pdserve decode`: a decode node (kv_consumer by default; kv_both also prefills by itself)."""
from __future__ import annotations


def register_cli(subparsers) -> None:
    from decode_node.node_cli import register_role

    register_role(subparsers, "decode", "run a decode node (receives KV, continuous batching, streams tokens)",
                  default_role="kv_consumer")
