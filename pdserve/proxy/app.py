"""The OpenAI-compatible front door: FastAPI app, its lifespan (sockets, index, indexer) and the endpoints.

Order of checks on a generation request (first failure answers): 401 bearer key -> 400 content type -> 413
body size -> 400 UTF-8, JSON, nesting, surrogates (proxy/request_body.py) -> 404 model -> 429 proxy queue full
-> 400 parameters and prompt length -> 400/429 sequences per request/per key (proxy/limits.py) -> 503 no live
node / node errors. Body parsing, tokenization and chat templating run in worker threads: the event loop only
moves bytes, so a huge or slow request never delays /health, heartbeats or other streams. A bug answers 500 in
OpenAI's shape from inside the handler, so uvicorn keeps the keep-alive connection usable.
/health, /ping, /version and /metrics need no key (probes and scrapers); /tokenize, /detokenize and
/v1/models do. Never imports torch (a test checks).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from typing import Optional

import zmq.asyncio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.proxy.config import ProxyConfig
from pdserve.proxy.dispatch import Dispatcher
from pdserve.proxy.errors import APIError, bad_request
from pdserve.proxy.indexer import Indexer
from pdserve.proxy.kv_peers import KVPeerIntroducer
from pdserve.proxy.limits import SequenceLimits
from pdserve.proxy.metrics import ProxyMetrics
from pdserve.proxy.node_rpc import NodeRpc
from pdserve.proxy.nodes import NodeRegistry
from pdserve.proxy.prefix_index import InProcessPrefixIndex
from pdserve.proxy.protocol import check_length, parse_chat, parse_completion
from pdserve.proxy.request_body import read_json_object
from pdserve.proxy.request_fields import generation_defaults, read_chat_template
from pdserve.proxy.router import Router
from pdserve.proxy.serving import Served, serve
from pdserve.proxy.tokenize import detokenize, tokenize
from pdserve.wire import curve
from pdserve.wire.frames import resolve_secret
from pdserve.wire.node_messages import ROLES, make_codec

log = logging.getLogger(__name__)


def model_max_len(model_dir: str) -> int:
    """config.json's context length (max_position_embeddings), else 2048."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return 2048
    return int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 2048)


class ProxyState:
    """Everything the endpoints share; built in the lifespan (it needs the running event loop)."""

    def __init__(self, config: ProxyConfig, tokenizer=None):
        from pdserve.wire.tokenizer import load_tokenizer  # torch-free

        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        self.model_names = config.served_model_names or (
            (config.served_model_name,)
            if config.served_model_name
            else (os.path.basename(os.path.normpath(config.model)),)
        )
        self.model_name = self.model_names[0]  # in responses and as model_name on vllm:* metrics
        self.max_model_len = config.max_model_len or model_max_len(config.model)
        if config.chat_template:  # --chat-template replaces the checkpoint's
            self.tokenizer.chat_template = read_chat_template(config.chat_template)
        self.sampling_defaults = generation_defaults(config.generation_config, config.model)
        token_chars = getattr(self.tokenizer, "max_token_chars", None)
        self.max_prompt_chars = self.max_model_len * token_chars if token_chars else None
        self.metrics = ProxyMetrics(self.model_name, self.max_model_len)
        self.limits = SequenceLimits(config.max_seqs_per_request, config.max_seqs_per_key)
        self.inflight = 0
        self.started = time.time()

    async def start(self) -> None:
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        self.ctx = zmq.asyncio.Context()
        self.registry = NodeRegistry(misses=cfg.heartbeat_misses)
        self.metrics.nodes = self.registry.live
        if cfg.redis_url:
            from pdserve.proxy.redis_index import RedisPrefixIndex

            self.index = RedisPrefixIndex(cfg.redis_url)
            self.metrics.watch_redis(lambda: self.index.up, lambda: self.index.errors)
        else:
            self.index = InProcessPrefixIndex()
        self.metrics.watch_index(self.index.num_blocks)
        if cfg.planner is not None:
            from pdserve.proxy.planner_wish import PlannerWish

            self.metrics.watch_planner(PlannerWish(cfg.planner), lambda: len(self.registry.live()))
        for role in ROLES:
            self.metrics.nodes_live.labels(role).set_function(
                lambda role=role: sum(1 for n in self.registry.live() if n.role == role)
            )
        proxy_id = cfg.proxy_id or f"proxy-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        drop = lambda reason: self.metrics.dropped_frames.labels(reason).inc()  # noqa: E731
        secret = resolve_secret(cfg.kv_secret or None, cfg.host)
        curve.check_available()
        self.rpc = NodeRpc(
            self.ctx, make_codec(secret), proxy_id, on_drop=drop, on_alive=self._rpc_alive, secret=secret
        )
        self.registry.on_up.append(lambda node: self.rpc.connect(node.rpc))
        self.kv_peers = KVPeerIntroducer(self.registry, self.rpc)  # after connect: it sends on that socket
        self.router = Router(cfg.router)
        self.dispatcher = Dispatcher(cfg, self.registry, self.index, self.router, self.rpc, self.metrics)
        self.indexer = Indexer(
            self.ctx, list(cfg.node_events), self.registry, self.index, on_drop=drop, secret=secret
        )
        self.indexer.start()
        self.served = Served(
            self.dispatcher, self.tokenizer, self.metrics, self.model_name, cfg.request_timeout_s
        )
        log.info(
            "proxy %s: model %s (max_model_len %d), %d node endpoint(s), routing %s, index %s",
            proxy_id,
            self.model_name,
            self.max_model_len,
            len(cfg.node_events),
            cfg.router.policy,
            f"redis {cfg.redis_url}" if cfg.redis_url else "in-process",
        )

    def _rpc_alive(self, rpc: str) -> None:
        node = self.registry.by_rpc(rpc)
        if node is not None:
            self.registry.touch(node.node_id)

    async def stop(self) -> None:
        await self.indexer.stop()
        await self.rpc.close_all()
        await self.index.close()
        self.ctx.term()

    def health(self) -> tuple[int, dict]:
        nodes = [n.describe() for n in self.registry.nodes.values()]
        decoders = self.registry.decoders()
        redis = "off"
        if self.config.redis_url:
            redis = "up" if self.index.up else "down"
        ok = bool(decoders)
        return (200 if ok else 503), {
            "status": "ok" if ok else "no_live_node",
            "model": self.model_name,
            "live_nodes": len(self.registry.live()),
            "redis": redis,
            "inflight": self.inflight,
            "nodes": nodes,
        }


class AsciiJSONResponse(JSONResponse):
    """Error bodies echo client text (a model name, a stop string): ASCII escapes render any of it."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error(exc: APIError) -> JSONResponse:
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
    return AsciiJSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(config: ProxyConfig, tokenizer=None) -> FastAPI:
    state = ProxyState(config, tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="pdserve proxy", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.proxy = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(APIError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(bad_request(str(exc)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        """A bug still answers in OpenAI's error shape (and is logged with its traceback)."""
        log.exception("unhandled error serving %s", request.url.path)
        return _error(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    def check_auth(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is None:
            return  # lenient: the one model we serve
        if model not in state.model_names and model != config.model:
            raise APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{state.model_name}'.",
                param="model",
                code="model_not_found",
            )

    async def generate(request: Request, endpoint: str, parse) -> Response:
        try:
            return await _generate(request, endpoint, parse)
        except APIError:
            raise
        except Exception as exc:  # noqa: BLE001 - answered here, not by Starlette, so the connection survives
            log.exception("unhandled error serving %s", request.url.path)
            state.metrics.requests.labels(endpoint, "500").inc()
            return _error(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    async def _generate(request: Request, endpoint: str, parse) -> Response:
        try:
            check_auth(request)
            body = await read_json_object(request, config.max_request_bytes)
            check_model(body)
            if state.inflight >= config.max_queue:
                raise APIError(
                    429,
                    f"the proxy's queue is full ({config.max_queue} requests in flight); retry later",
                    code="queue_full",
                )
            # Tokenizing (or templating) a long prompt takes long: off the event loop.
            req = await asyncio.to_thread(
                parse, body, state.tokenizer, state.max_prompt_chars, state.sampling_defaults
            )
            for name, asked in (("logprobs", req.logprobs), ("prompt_logprobs", req.prompt_logprobs)):
                if asked is not None and asked > config.max_logprobs:
                    raise bad_request(
                        f"{name} {asked} is more than this server's --max-logprobs {config.max_logprobs}",
                        param=name,
                    )
            check_length(req, state.max_model_len)
            key = state.limits.key_of(request.headers.get("authorization", ""))
            sequences = len(req.prompts) * req.params.n
            state.limits.acquire(key, sequences)
        except APIError as exc:
            state.metrics.requests.labels(endpoint, str(exc.status)).inc()
            raise
        state.inflight += 1
        state.metrics.inflight.inc()
        return await serve(
            state.served,
            request,
            req,
            endpoint,
            on_end=lambda: (state.limits.release(key, sequences), _done()),
        )

    def _done() -> None:
        state.inflight -= 1
        state.metrics.inflight.dec()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completions", parse_completion)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat", parse_chat)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "pdserve",
                    "root": config.model,
                    "max_model_len": state.max_model_len,
                }
                for name in state.model_names
            ],
        }

    async def _json_body(request: Request) -> dict:
        check_auth(request)
        body = await read_json_object(request, config.max_request_bytes)
        check_model(body)
        return body

    @app.post("/tokenize")
    async def tokenize_endpoint(request: Request):
        body = await _json_body(request)
        return await asyncio.to_thread(
            tokenize, body, state.tokenizer, state.max_model_len, state.max_prompt_chars
        )

    @app.post("/detokenize")
    async def detokenize_endpoint(request: Request):
        body = await _json_body(request)
        return await asyncio.to_thread(detokenize, body, state.tokenizer)

    @app.get("/version")
    async def version():
        return {"version": pdserve_version()}

    @app.get("/health")
    async def health():
        status, body = state.health()
        return JSONResponse(body, status_code=status)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping():
        """vLLM's (SageMaker's) liveness probe: /health's status, no body."""
        status, _ = state.health()
        return Response(status_code=status)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def pdserve_version() -> str:
    try:
        from importlib.metadata import version

        return version("pdserve")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on sys.path)
        return "0.0.0+unknown"


def proxy_state(app: FastAPI) -> Optional[ProxyState]:
    return getattr(app.state, "proxy", None)
