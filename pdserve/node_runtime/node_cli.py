"""What `pdserve prefill` and `pdserve decode` share: the node flags and the run function.

Flags: the engine's (`engine.config.add_engine_args`, including --kv-transfer-config), the KV connector's
(--kv-secret, --kv-timeout) and the node's own (--host, --rpc-port, --events-port, --http-port, --node-id,
--max-num-waiting). Everything binds --host (loopback by default). A role's `kv_role` defaults to the
subcommand (prefill: kv_producer, decode: kv_consumer) unless --kv-transfer-config names one; kv_both serves
colocated and disaggregated requests alike.

SIGTERM (or SIGINT) drains the node: it stops admitting (a retryable 503 the proxy re-routes), /health turns
503 and heartbeats say draining so proxies stop routing to it, in-flight requests finish for up to
--shutdown-timeout seconds, what is left is failed (retryable while it has no token), every block is freed,
and the process exits. A second signal cuts the drain short.

Before it binds its ports the node warms up (node_runtime/warmup.py): /health never says 200 for a cold node.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import threading

from pdserve.kvconnector.scheduler_side import DEFAULT_KV_TIMEOUT
from pdserve.wire.bind import advertised

log = logging.getLogger(__name__)

# A node prints this line once it serves; `pdserve up` and the test harness read its bound endpoints from it
# (nodes they start bind port 0, so no port is raced for). ready_line writes it, READY_LINE parses it.
READY_LINE = re.compile(r"pdserve node \S+ ready: rpc (\S+) events (\S+) http (\S+)")


def ready_line(node_id: str, rpc: str, events: str, http: str) -> str:
    return f"pdserve node {node_id} ready: rpc {rpc} events {events} http {http}"


def add_node_args(parser: argparse.ArgumentParser) -> None:
    from pdserve.engine.config import add_engine_args

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
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the model's name(s); the first is model_name on vllm:* metrics (default: the --model folder's "
        "name, or the hub id as given)",
    )
    g.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="most logprobs a request may ask for (vLLM's flag; 0..20, -1 = 20)",
    )
    g.add_argument(
        "--kv-events-config",
        default=None,
        help='vLLM\'s JSON, e.g. {"enable_kv_cache_events": true, "publisher": "zmq", '
        '"endpoint": "tcp://127.0.0.1:5557", "topic": "kv-events"}: also publish KV events there',
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish before failing them",
    )
    g.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the served shapes once before binding ports (compiles kernels before /health says 200)",
    )
    g.add_argument(
        "--max-num-waiting",
        type=int,
        default=1024,
        help="engine queue depth beyond which new requests get 429",
    )


def kv_transfer_json(args: argparse.Namespace, default_role: str) -> str:
    """--kv-transfer-config with kv_role filled from the subcommand when it names none."""
    from pdserve.wire.serving_flags import json_object_flag

    raw = json_object_flag(args.kv_transfer_config, "--kv-transfer-config")
    raw.setdefault("kv_role", default_role)
    return json.dumps(raw)


KV_EVENTS_KEYS = {
    "enable_kv_cache_events",
    "publisher",
    "endpoint",
    "replay_endpoint",
    "buffer_steps",
    "hwm",
    "max_queue_size",
    "topic",
}


def kv_events_config(text: str | None, host: str) -> dict | None:
    """--kv-events-config (vLLM's KVEventsConfig JSON) -> {"endpoint", "topic", "hwm"} when events are on,
    else None. vLLM's default endpoint binds every interface (tcp://*:5557); ours binds --host unless
    asked."""
    from pdserve.wire.errors import ConfigError
    from pdserve.wire.serving_flags import json_object_flag

    raw = json_object_flag(text, "--kv-events-config")
    unknown = sorted(set(raw) - KV_EVENTS_KEYS)
    if unknown:
        raise ConfigError(f"--kv-events-config: unknown key(s) {', '.join(unknown)}")
    publisher = raw.get("publisher", "zmq" if raw.get("enable_kv_cache_events") else "null")
    if publisher not in ("null", "zmq"):
        raise ConfigError(f"--kv-events-config: publisher must be zmq or null, got {publisher!r}")
    if raw.get("replay_endpoint"):
        raise ConfigError(
            "--kv-events-config: replay_endpoint is not supported (subscribers resync on a gap)"
        )
    if not raw.get("enable_kv_cache_events", False) or publisher == "null":
        return None
    endpoint = raw.get("endpoint") or f"tcp://{host}:5557"
    if not isinstance(endpoint, str) or not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(
            f"--kv-events-config: endpoint must be a ZMQ address like tcp://HOST:PORT, got {endpoint!r}"
        )
    topic, hwm = raw.get("topic", ""), raw.get("hwm", 100_000)
    if not isinstance(topic, str):
        raise ConfigError("--kv-events-config: topic must be a string")
    if not isinstance(hwm, int) or isinstance(hwm, bool) or hwm < 1:
        raise ConfigError("--kv-events-config: hwm must be a positive integer")
    return {"endpoint": endpoint, "topic": topic, "hwm": hwm}


def check_node_args(args: argparse.Namespace) -> None:
    from pdserve.wire.serving_flags import check_shared_serving_flags

    check_shared_serving_flags(args)


def run_node(args: argparse.Namespace, default_role: str) -> int:
    from pdserve.engine.config import engine_config_from_args
    from pdserve.node_runtime.node_options import NodeOptions
    from pdserve.node_runtime.node_server import NodeServer
    from pdserve.wire.model_source import resolve_model_flag

    check_node_args(args)
    kv_events = kv_events_config(args.kv_events_config, args.host)
    args.kv_transfer_config = kv_transfer_json(args, default_role)
    resolve_model_flag(args)  # a hub id -> its cached folder (and the served name, unless one is given)
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
        served_model_names=tuple(args.served_model_name or ()),
        max_logprobs=args.max_logprobs,
        shutdown_timeout=args.shutdown_timeout,
        kv_events=kv_events,
        warmup=args.warmup,
    )
    stop, force = threading.Event(), threading.Event()

    def on_signal(*_):
        (force if stop.is_set() else stop).set()  # the second signal cuts the drain short

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    node = NodeServer(config, options).start()
    print(
        ready_line(node.node_id, node.rpc_endpoint, advertised(node.rpc.events_endpoint), node.http_url),
        flush=True,
    )
    try:
        node.serve_forever(stop)
        if node.loop.alive:
            node.drain(options.shutdown_timeout, force)
    finally:
        node.stop()
        # ends ZMQ's I/O threads once the frames queued at stop left (each socket's linger bounds the wait):
        # without it the process could exit with a drained request's final Tokens still queued
        import zmq

        from pdserve.node_runtime.rpc_server import CLOSE_LINGER_MS

        zmq.Context.instance().destroy(linger=CLOSE_LINGER_MS)
    return 0


def register_role(subparsers, name: str, help_text: str, default_role: str) -> None:
    """Add `pdserve <name>`: a node whose kv_role defaults to default_role unless --kv-transfer-config
    says."""
    p = subparsers.add_parser(name, help=help_text)
    add_node_args(p)
    p.set_defaults(func=lambda args: run_node(args, default_role=default_role))
