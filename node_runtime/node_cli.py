"""What `pdserve prefill` and `pdserve decode` share: the node flags and the run function.

Flags: the engine's (`engine.config.add_engine_args`, including --kv-transfer-config), the KV connector's
(--kv-secret, --kv-timeout) and the node's own (--host, --rpc-port, --events-port, --http-port, --node-id,
--max-num-waiting). Everything binds --host (loopback by default). A role's `kv_role` defaults to the
subcommand (prefill: kv_producer, decode: kv_consumer) unless --kv-transfer-config names one; kv_both serves
colocated and disaggregated requests alike. SIGINT/SIGTERM stop the node cleanly.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import threading

from kvconnector.scheduler_side import DEFAULT_KV_TIMEOUT
from wire.bind import advertised

log = logging.getLogger(__name__)

# A node prints this line once it serves; `pdserve up` and the test harness read its bound endpoints from it
# (nodes they start bind port 0, so no port is raced for). ready_line writes it, READY_LINE parses it.
READY_LINE = re.compile(r"pdserve node \S+ ready: rpc (\S+) events (\S+) http (\S+)")


def ready_line(node_id: str, rpc: str, events: str, http: str) -> str:
    return f"pdserve node {node_id} ready: rpc {rpc} events {events} http {http}"


def add_node_args(parser: argparse.ArgumentParser) -> None:
    from engine.config import add_engine_args

    add_engine_args(parser)  # torch-free: `pdserve proxy` builds this parser too and must not import torch
    k = parser.add_argument_group("kv transfer")
    k.add_argument(
        "--kv-secret",
        default=None,
        help="shared HMAC secret for KV links and node RPC frames (else $PDSERVE_KV_SECRET)",
    )
    k.add_argument(
        "--kv-timeout",
        type=float,
        default=DEFAULT_KV_TIMEOUT,
        help="seconds without KV progress before a transfer is aborted and its blocks freed",
    )
    g = parser.add_argument_group("node")
    g.add_argument("--host", default="127.0.0.1", help="address every socket binds (loopback by default)")
    g.add_argument("--rpc-port", type=int, default=0, help="ZMQ ROUTER for proxies and decode nodes (0: any)")
    g.add_argument("--events-port", type=int, default=0, help="ZMQ PUB of KV events and heartbeats (0: any)")
    g.add_argument("--http-port", type=int, default=0, help="/health and /metrics (0: any)")
    g.add_argument("--node-id", default="", help="name in heartbeats and logs (default: role-host-rpcport)")
    g.add_argument(
        "--max-num-waiting",
        type=int,
        default=1024,
        help="engine queue depth beyond which new requests get 429",
    )


def kv_transfer_json(args: argparse.Namespace, default_role: str) -> str:
    """--kv-transfer-config with kv_role filled from the subcommand when it names none."""
    raw = json.loads(args.kv_transfer_config) if args.kv_transfer_config else {}
    if not isinstance(raw, dict):
        from wire.errors import ConfigError

        raise ConfigError("--kv-transfer-config must be a JSON object")
    raw.setdefault("kv_role", default_role)
    return json.dumps(raw)


def run_node(args: argparse.Namespace, default_role: str) -> int:
    from engine.config import engine_config_from_args
    from node_runtime.node_server import NodeOptions, NodeServer

    args.kv_transfer_config = kv_transfer_json(args, default_role)
    config = engine_config_from_args(args)
    options = NodeOptions(
        host=args.host,
        rpc_port=args.rpc_port,
        events_port=args.events_port,
        http_port=args.http_port,
        node_id=args.node_id,
        role=config.kv_transfer.kv_role,
        kv_timeout=args.kv_timeout,
        kv_secret=args.kv_secret,
        max_num_waiting=args.max_num_waiting,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = NodeServer(config, options).start()
    print(
        ready_line(node.node_id, node.rpc_endpoint, advertised(node.rpc.events_endpoint), node.http_url),
        flush=True,
    )
    try:
        node.serve_forever(stop)
    finally:
        node.stop()
    return 0


def register_role(subparsers, name: str, help_text: str, default_role: str) -> None:
    """Add `pdserve <name>`: a node whose kv_role defaults to default_role unless --kv-transfer-config
    says."""
    p = subparsers.add_parser(name, help=help_text)
    add_node_args(p)
    p.set_defaults(func=lambda args: run_node(args, default_role=default_role))
