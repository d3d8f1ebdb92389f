"""`pdserve proxy`: the OpenAI-compatible front door over prefill and decode nodes.

    pdserve proxy --model DIR|ORG/NAME --node tcp://127.0.0.1:7101 --node tcp://127.0.0.1:7201 [--port 8000]
                  [--redis-url redis://127.0.0.1:6379/0] [--routing cache_aware|round_robin] [--api-key KEY]

`--node` names a node's *events* endpoint; the node announces its role, rpc and http endpoints in heartbeats.
"""

from __future__ import annotations

import argparse
import logging
import os

from pdserve.proxy.config import PlannerGoals, ProxyConfig, RouterConfig
from pdserve.wire.errors import ConfigError
from pdserve.wire.frames import resolve_secret
from pdserve.wire.model_source import resolve_model_flag
from pdserve.wire.serving_flags import check_shared_serving_flags

log = logging.getLogger(__name__)


def add_proxy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="the checkpoint (tokenizer, chat template, config.json): a folder or a Hugging Face hub id in "
        "the local cache (org/name; offline)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="EVENTS_ENDPOINT",
        help="a node's events endpoint, e.g. tcp://127.0.0.1:7101 (repeatable)",
    )
    p.add_argument(
        "--redis-url", default="", help="keep the prefix index in Redis (shared by several proxies)"
    )
    p.add_argument("--routing", default="cache_aware", choices=["cache_aware", "round_robin"])
    p.add_argument(
        "--disagg-min-tokens",
        type=int,
        default=RouterConfig.disagg_min_tokens,
        help="prefill on the decode node itself when fewer prompt tokens than this need computing",
    )
    p.add_argument("--log-routing", action="store_true", help="log each routing decision with its terms")
    p.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY", ""),
        help="require 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY)",
    )
    p.add_argument("--max-model-len", type=int, default=0, help="default: the checkpoint's context length")
    p.add_argument(
        "--served-model-name",
        nargs="+",
        default=[],
        metavar="NAME",
        help="the model name(s) clients may use; the first is the one responses and metrics carry "
        "(default: the --model folder's name, or the hub id as given)",
    )
    p.add_argument(
        "--max-logprobs", type=int, default=20, help="most logprobs a request may ask for (0..20, -1 = 20)"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM: stop accepting connections and let open requests and streams finish this long",
    )
    p.add_argument(
        "--chat-template",
        default="",
        help="a chat template file, or the template itself (replaces the model's)",
    )
    p.add_argument(
        "--generation-config",
        default="auto",
        help="sampling defaults: auto (the model's generation_config.json), vllm (none) or a folder",
    )
    p.add_argument("--max-queue", type=int, default=1024, help="requests in flight before answering 429")
    p.add_argument(
        "--max-seqs-per-request",
        type=int,
        default=ProxyConfig.max_seqs_per_request,
        help="most sequences (prompts x n) one request may ask for (400 above)",
    )
    p.add_argument(
        "--max-seqs-per-key",
        type=int,
        default=ProxyConfig.max_seqs_per_key,
        help="most concurrent sequences one API key may run (429 above)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=ProxyConfig.max_request_bytes,
        help="largest request body; a larger one is answered 413 before it is read whole",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all")
    p.add_argument(
        "--max-retries", type=int, default=2, help="re-sends before the first token on node failure"
    )
    p.add_argument("--heartbeat-misses", type=int, default=3, help="silent heartbeats before a node is dead")
    p.add_argument(
        "--kv-secret", default=None, help="shared frame-signing secret (default: $PDSERVE_KV_SECRET)"
    )
    p.add_argument(
        "--planner-profile",
        default="",
        help="a `pdserve profile` JSON: export pdserve:desired_prefill_nodes / desired_decode_nodes for the "
        "traffic of the last --planner-window seconds",
    )
    p.add_argument("--planner-ttft-ms", type=float, default=1000.0, help="the planner's TTFT goal")
    p.add_argument("--planner-itl-ms", type=float, default=50.0, help="the planner's p99 ITL goal")
    p.add_argument(
        "--planner-gpus", type=int, default=0, help="GPUs to plan for (default: the live nodes' GPUs)"
    )
    p.add_argument("--planner-window", type=float, default=60.0, help="seconds of traffic the wish follows")


def config_from_args(args: argparse.Namespace) -> ProxyConfig:
    resolve_model_flag(args)  # a hub id -> its cached folder (and the served name, unless one is given)
    if not os.path.isdir(args.model):
        raise ConfigError(f"--model {args.model!r} is not a folder")
    if args.max_seqs_per_request < 1 or args.max_seqs_per_key < args.max_seqs_per_request:
        raise ConfigError("--max-seqs-per-request must be >= 1 and --max-seqs-per-key >= it")
    if args.max_request_bytes < 1024:
        raise ConfigError("--max-request-bytes must be at least 1024")
    if args.max_queue < 1 or args.request_timeout <= 0 or args.max_retries < 0 or args.heartbeat_misses < 1:
        raise ConfigError(
            "--max-queue and --heartbeat-misses must be >= 1, --request-timeout > 0, --max-retries >= 0"
        )
    check_shared_serving_flags(args)
    names = list(args.served_model_name or [])
    if not args.node:
        log.warning("no --node given: every generation request will answer 503")
    try:
        resolve_secret(args.kv_secret or None, args.host)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ProxyConfig(
        planner=planner_goals(args),
        model=args.model,
        served_model_name=names[0] if names else "",
        served_model_names=tuple(names),
        max_logprobs=args.max_logprobs,
        shutdown_timeout_s=args.shutdown_timeout,
        host=args.host,
        port=args.port,
        node_events=tuple(args.node),
        redis_url=args.redis_url,
        api_key=args.api_key,
        max_model_len=args.max_model_len,
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        max_seqs_per_request=args.max_seqs_per_request,
        max_seqs_per_key=args.max_seqs_per_key,
        request_timeout_s=args.request_timeout,
        max_retries=args.max_retries,
        heartbeat_misses=args.heartbeat_misses,
        kv_secret=args.kv_secret or "",
        chat_template=getattr(args, "chat_template", "") or "",
        generation_config=getattr(args, "generation_config", "auto") or "auto",
        router=RouterConfig(
            policy=args.routing, disagg_min_tokens=args.disagg_min_tokens, log_decisions=args.log_routing
        ),
    )


def planner_goals(args: argparse.Namespace) -> PlannerGoals | None:
    if not args.planner_profile:
        return None
    if min(args.planner_ttft_ms, args.planner_itl_ms, args.planner_window) <= 0 or args.planner_gpus < 0:
        raise ConfigError(
            "--planner-ttft-ms, --planner-itl-ms and --planner-window must be > 0, --planner-gpus >= 0"
        )
    from pdserve.planner.profile import Profile

    Profile.load(args.planner_profile)  # a profile that cannot be read stops the proxy here, with its reason
    return PlannerGoals(
        args.planner_profile,
        args.planner_ttft_ms,
        args.planner_itl_ms,
        args.planner_gpus,
        args.planner_window,
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from pdserve.proxy.app import create_app

    config = config_from_args(args)
    app = create_app(config)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=args.log_level.lower(),
        access_log=False,
        # SIGTERM: uvicorn stops accepting at once and lets open requests (streams too) finish this long.
        timeout_graceful_shutdown=config.shutdown_timeout_s,
    )
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "proxy",
        help="the OpenAI-compatible proxy in front of prefill and decode nodes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_proxy_args(p)
    p.set_defaults(func=run)
