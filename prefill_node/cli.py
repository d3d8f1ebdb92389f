"""`pdserve prefill`: a prefill node (kv_producer by default; kv_both also decodes by itself)."""
from __future__ import annotations


def register_cli(subparsers) -> None:
    from decode_node.node_cli import register_role

    register_role(subparsers, "prefill", "run a prefill node (chunked prefill, pushes KV layer by layer)",
                  default_role="kv_producer")
