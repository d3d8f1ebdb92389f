"""`pdserve prefill`: a prefill node (kv_producer by default; kv_both also decodes by itself)."""
from __future__ import annotations

import argparse


def register_cli(subparsers) -> None:
    from decode_node.node_cli import add_node_args

    p = subparsers.add_parser("prefill", help="run a prefill node (chunked prefill, pushes KV layer by layer)")
    add_node_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from decode_node.node_cli import run_node

    return run_node(args, default_role="kv_producer")
