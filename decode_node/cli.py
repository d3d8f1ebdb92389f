"""`pdserve decode`: a decode node (kv_consumer by default; kv_both also prefills by itself)."""
from __future__ import annotations

import argparse


def register_cli(subparsers) -> None:
    from decode_node.node_cli import add_node_args

    p = subparsers.add_parser("decode", help="run a decode node (receives KV, continuous batching, streams tokens)")
    add_node_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from decode_node.node_cli import run_node

    return run_node(args, default_role="kv_consumer")
