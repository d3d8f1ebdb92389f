"""A serving node: one engine, its RPC/event sockets, /health and /metrics, and the request table.

Both `pdserve prefill` and `pdserve decode` run this class; `kv_role` decides what else it does:
    every role     `generate` mode colocated: prefill and decode here (conditional disaggregation, the
                   baseline)
    kv_consumer    `generate` mode disaggregated: reserve, drive a prefill node, receive KV, decode
                   (disagg.py)
    kv_producer    `prefill` from a decode node: prefill, push KV layer by layer, send the first token
    kv_both        all of the above
Threads: the engine loop owns the EngineCore; the RPC thread owns every ZMQ socket; the HTTP server answers
scrapes; the KV connector has its own. The request table is guarded by `self.lock`; nothing blocks while
holding it.

A request the node serves for a proxy ends exactly once (`_end`): finished, aborted by the proxy, past its
deadline, its proxy gone (unroutable), or failed (engine error, KV transfer failure). Each path frees its
blocks.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from pdserve.engine.engine_loop import EngineLoop, Sink
from pdserve.node_runtime import roles
from pdserve.node_runtime.door import Refused, check_at_door
from pdserve.node_runtime.http_server import HttpServer
from pdserve.node_runtime.node_metrics import NodeMetrics
from pdserve.node_runtime.node_options import NodeOptions
from pdserve.node_runtime.node_status import NodeStatus
from pdserve.node_runtime.rpc_server import RpcServer
from pdserve.wire.bind import advertised
from pdserve.wire.errors import ConfigError, PromptTooLongError
from pdserve.wire.node_messages import (
    HEARTBEAT_INTERVAL_S,
    Abort,
    Error,
    Generate,
    KVPeers,
    NodeRole,
    Prefill,
    Tokens,
    make_codec,
    plain,
    prompt_logprob_pieces,
)
from pdserve.wire.sampling_params import SamplingParams
from pdserve.wire.vllm_metrics import FinishedRequest, VllmMetrics

log = logging.getLogger(__name__)

FINAL_FRAMES_GRACE_S = 0.5  # a drained node keeps its sockets open this long after its last request ended


@dataclass(eq=False)
class LiveRequest:
    """A request this node serves for a proxy (generate), from arrival to its one end."""

    request_id: str
    identity: bytes  # the proxy's DEALER
    mode: str
    arrival: float = field(default_factory=time.monotonic)
    deadline: float = 0.0  # monotonic; 0 = none
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    num_generated: int = 0
    prompt_tokens: int = 0
    max_tokens: Optional[int] = None
    ended: bool = False
    timings: dict = field(default_factory=dict)


class NodeServer:
    def __init__(self, config, options: NodeOptions, core=None):
        from pdserve.wire.frames import resolve_secret

        self.config, self.options = config, options
        self.node_id = (
            options.node_id
            or f"{NodeRole.of_kv_role(options.role).value}-{socket.gethostname()}-{options.rpc_port}"
        )
        self.role = options.role
        try:
            self.secret = resolve_secret(options.kv_secret, options.host)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.core = core if core is not None else _build_core(config)  # emits KV events: the proxy's index
        self.loop = EngineLoop(self.core)
        self.status = NodeStatus(self)  # heartbeat, /health, gauges, KV events
        self.loop.after_step.append(self.status.publish_kv_events)
        self.lock = threading.RLock()
        self.requests: dict[str, LiveRequest] = {}
        self.metrics = NodeMetrics(lambda: self.loop.snapshot, self.status.extra_gauges)
        self.model_name = (options.served_model_names or (_folder_name(config.model.model),))[0]
        self.vllm = VllmMetrics(
            self.metrics.registry,
            self.model_name,
            "0",
            self.core.scheduler.max_model_len,
            self.status.engine_state,
        )
        self._baseline = None  # the engine's counters after warm-up: vllm:* series count served work only
        self.draining = False
        self.kv_events_pub = None
        host = options.host
        self.rpc = RpcServer(
            make_codec(self.secret),
            f"tcp://{host}:{options.rpc_port}",
            f"tcp://{host}:{options.events_port}" if options.events_port >= 0 else None,
            on_message=self._on_message,
            on_drop=lambda reason: self.metrics.dropped.labels(reason).inc(),
            on_unroutable=self._on_unroutable,
            on_peer_message=self._on_peer_message,
            on_peer_lost=self._on_peer_lost,
            identity=self.node_id,
            secret=self.secret,
            ticks=[(HEARTBEAT_INTERVAL_S, self.status.heartbeat), (0.05, self._check_deadlines)],
        )
        self.http = HttpServer(host, options.http_port, self.status.health, self.metrics.render)
        parts = roles.PARTS_BY_KV_ROLE[self.role]
        self.decode = roles.build(roles.DECODE, self) if roles.DECODE in parts else None
        self.prefill = roles.build(roles.PREFILL, self) if roles.PREFILL in parts else None

    # ---- lifecycle -----------------------------------------------------------------------------------------
    @property
    def rpc_endpoint(self) -> str:
        """Where others reach our ROUTER (a wildcard bind is advertised under this host's address)."""
        return advertised(self.rpc.rpc_endpoint)

    @property
    def http_url(self) -> str:
        return advertised(self.http.url)

    def start(self) -> "NodeServer":
        self.loop.start()
        if self.options.warmup:
            from pdserve.node_runtime.warmup import warm_up

            warm_up(self.loop, self.core)
        self._baseline = self.loop.call(self.status.snapshot_now).result(timeout=60)
        if self.options.kv_events:
            from pdserve.node_runtime.kv_events_publisher import KVEventPublisher

            ev = self.options.kv_events
            self.kv_events_pub = KVEventPublisher(ev["endpoint"], topic=ev["topic"], hwm=ev["hwm"])
            log.info(
                "KV events (--kv-events-config) on %s, topic %r", self.kv_events_pub.endpoint, ev["topic"]
            )
        self.rpc.start()
        self.http.start()
        log.info(
            "node %s (%s) serving: rpc %s, events %s, http %s%s",
            self.node_id,
            self.role,
            self.rpc.rpc_endpoint,
            self.rpc.events_endpoint or "-",
            self.http.url,
            f", kv {self.decode.kv_endpoint}" if self.decode is not None else "",
        )
        return self

    def stop(self) -> None:
        for part in (self.prefill, self.decode):
            if part is not None:
                part.close()
        self.rpc.stop()
        self.loop.stop()
        self.http.stop()
        if self.kv_events_pub is not None:
            self.kv_events_pub.close()
        self.core.close()

    def serve_forever(self, stop_event: threading.Event) -> None:
        while not stop_event.wait(0.5):
            if not self.loop.alive:
                log.error("the engine loop died; shutting down")
                break

    # ---- graceful drain (SIGTERM) ------------------------------------------------------------------------
    def in_flight(self) -> int:
        with self.lock:
            n = len(self.requests)
        return n + (self.prefill.num_active if self.prefill is not None else 0)

    def drain(self, timeout_s: float, force: Optional[threading.Event] = None) -> bool:
        """Stop admitting (new requests get a retryable 503 marked node_draining, so proxies re-route them;
        /health answers 503 and heartbeats say draining, so proxies stop routing here), let what is in flight
        finish for up to timeout_s, then fail what is left (retryable while it has no token). True if nothing
        was cut."""
        self.draining = True
        self.status.heartbeat()  # tell proxies now, not at the next tick
        log.info(
            "node %s draining: %d request(s) in flight, up to %.0f s",
            self.node_id,
            self.in_flight(),
            timeout_s,
        )
        deadline = time.monotonic() + timeout_s
        while self.in_flight() and time.monotonic() < deadline and not (force is not None and force.is_set()):
            time.sleep(0.05)
        with self.lock:
            left = list(self.requests.values())
        for live in left:
            self.fail(
                live,
                503,
                f"node {self.node_id} shut down",
                retryable=not live.num_generated,
                cause="shutdown",
            )
        self._let_last_outputs_out()
        log.info("node %s drained (%d request(s) cut)", self.node_id, len(left))
        return not left

    def _let_last_outputs_out(self) -> None:
        """A finished request leaves `requests` (take) just before the loop thread queues its final Tokens:
        one call through the loop puts that message in the RPC outbox; without these waits a drained request's
        final Tokens was sometimes lost, and the proxy failed it mid-stream once the node fell silent."""
        try:
            self.loop.call(lambda: None).result(timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - a dead or stopped loop queues nothing more anyway
            log.debug("drain: the engine loop did not answer (%s)", exc)
        # Then let them reach the proxies while every socket still reads and writes: frames still in flight
        # when the sockets close were lost now and then (2 of ~15 drains under load), linger or not.
        time.sleep(FINAL_FRAMES_GRACE_S)

    # ---- incoming ------------------------------------------------------------------------------------------
    def _on_message(self, identity: bytes, msg) -> None:
        if (self.draining or self.loop.broken) and isinstance(msg, (Generate, Prefill)):
            why = f"node {self.node_id} is " + (
                f"broken: {self.loop.broken}" if self.loop.broken else "draining"
            )
            return self.reject(identity, msg.request_id, 503, why, retryable=True, draining=True)
        if isinstance(msg, Generate):
            self._on_generate(identity, msg)
        elif isinstance(msg, Abort):
            self._on_abort(msg.request_id, msg.reason)
        elif isinstance(msg, KVPeers):
            if self.prefill is not None:  # a node that only decodes has no links of its own to open
                self.prefill.preconnect(msg.endpoints)
        elif self.prefill is not None and self.prefill.handles(msg):
            self.prefill.on_message(identity, msg)
        else:
            self.metrics.dropped.labels("unexpected").inc()
            log.warning("dropped an unexpected %s from %r", type(msg).__name__, identity)

    def _on_peer_message(self, endpoint: str, msg) -> None:
        if self.decode is not None:
            self.decode.on_prefill_message(endpoint, msg)

    def _on_peer_lost(self, endpoint: str) -> None:
        if self.decode is not None:
            self.decode.on_prefill_node_lost(endpoint)

    def _on_generate(self, identity: bytes, msg: Generate) -> None:
        rid = msg.request_id
        params = self.admit_or_reject(identity, rid, msg.params, msg.prompt_token_ids)
        if params is None:
            return
        if msg.mode == "disaggregated" and self.decode is None:
            return self.reject(
                identity,
                rid,
                503,
                f"node {self.node_id} ({self.role}) does not decode for prefill nodes",
                retryable=True,
            )
        live = LiveRequest(rid, identity, msg.mode, prompt_tokens=len(msg.prompt_token_ids))
        live.max_tokens = params.max_tokens
        if msg.deadline_s > 0:
            live.deadline = live.arrival + msg.deadline_s
        with self.lock:
            if rid in self.requests:
                return self.reject(identity, rid, 400, f"request id {rid!r} is already in use")
            self.requests[rid] = live
        if msg.mode == "disaggregated":
            self.decode.generate(live, msg, params)
        else:
            self._generate_colocated(live, msg, params)

    def _generate_colocated(self, live: LiveRequest, msg: Generate, params: SamplingParams) -> None:
        sink = Sink(
            on_output=lambda out: self.on_output(live, out),
            on_fail=lambda why: self.fail(live, 503, why, retryable=False, cause="error"),
            on_scheduled=lambda t: setattr(live, "scheduled_at", t),
        )
        future = self.loop.add_request(live.request_id, msg.prompt_token_ids, params, sink)
        future.add_done_callback(lambda f: self._added(live, f))

    def _added(self, live: LiveRequest, future) -> None:
        exc = future.exception()
        if exc is None:
            return
        status = 400 if isinstance(exc, (PromptTooLongError, ValueError)) else 503
        self.fail(live, status, str(exc), retryable=status == 503, cause="rejected", count_abort=False)

    def _on_abort(self, request_id: str, reason: str) -> None:
        with self.lock:
            live = self.requests.get(request_id)
        if live is not None:
            self.end(live, "abort", cause="client")
        elif self.prefill is not None:
            self.prefill.abort(request_id, reason or "aborted by the decode node")

    def _on_unroutable(self, identity: bytes) -> None:
        with self.lock:
            gone = [r for r in self.requests.values() if r.identity == identity]
        for live in gone:
            self.end(live, "abort", cause="client_gone", notify=False)
        if self.prefill is not None:
            self.prefill.on_unroutable(identity)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        with self.lock:
            late = [r for r in self.requests.values() if r.deadline and r.deadline <= now]
        for live in late:
            self.fail(live, 504, "the request's deadline passed", retryable=False, cause="deadline")
        if self.decode is not None:  # the prefill side waits only on the connector, which times itself out
            self.decode.check_timeouts(now)

    # ---- outgoing ------------------------------------------------------------------------------------------
    def on_output(self, live: LiveRequest, out) -> None:
        """A StepOutput of a request running in this engine (loop thread)."""
        if live.ended:
            return
        self.tokens_out(live, len(out.new_token_ids))
        timings = None
        if out.finished:
            timings = self.final_timings(live)
            if not self.take(live, out.finish_reason or "stop"):
                return
            self.metrics.finished.labels(out.finish_reason or "stop").inc()
        if out.prompt_logprobs:  # before the first token, so the proxy holds them when it answers
            for piece in prompt_logprob_pieces(live.request_id, out.prompt_logprobs):
                self.rpc.send(live.identity, piece)
        self.rpc.send(
            live.identity,
            Tokens(
                request_id=live.request_id,
                token_ids=list(out.new_token_ids),
                logprobs=plain(out.new_logprobs) if out.new_logprobs is not None else None,
                finished=out.finished,
                finish_reason=out.finish_reason,
                num_cached_tokens=max(out.num_cached_tokens, 0),
                timings=timings,
            ),
        )

    def final_timings(self, live: LiveRequest) -> dict:
        t = {
            "prefill_queue": 0.0,
            "prefill": 0.0,
            "transfer": 0.0,
            "exposed_transfer": 0.0,
            "decode_queue": 0.0,
        }
        if live.mode == "colocated":
            scheduled = live.scheduled_at or live.arrival
            t["prefill_queue"] = max(scheduled - live.arrival, 0.0)
            t["prefill"] = max((live.first_token_at or scheduled) - scheduled, 0.0)
        t.update(live.timings)
        return t

    def admit_or_reject(
        self, identity: bytes, request_id: str, params: dict, prompt_token_ids: list[int]
    ) -> SamplingParams | None:
        """The checks every request meets at a node's door (door.py); None once it was rejected (and
        answered)."""
        try:
            return check_at_door(self, params, prompt_token_ids)
        except Refused as exc:
            return self.reject(identity, request_id, exc.status, str(exc), retryable=exc.retryable)

    def reject(
        self,
        identity: bytes,
        request_id: str,
        status: int,
        message: str,
        retryable: bool = False,
        draining: bool = False,
    ) -> None:
        self.metrics.rejected.labels(str(status)).inc()
        self.rpc.send(
            identity,
            Error(
                request_id=request_id,
                status=status,
                message=message,
                retryable=retryable,
                node_draining=draining,
            ),
        )

    def tokens_out(self, live: LiveRequest, n: int) -> None:
        """n more output tokens of live are on their way to the proxy: TTFT, ITL and token counters."""
        if n <= 0:
            return
        now = time.monotonic()
        if not live.num_generated:
            live.first_token_at = live.first_token_at or now
            self.vllm.first_token(live.first_token_at - live.arrival)
            self.vllm.prompt_tokens.inc(live.prompt_tokens)
            self.vllm.generation_tokens.inc(n)
        else:
            self.vllm.tokens_arrived(now - live.last_token_at, n)
        live.last_token_at = now
        live.num_generated += n

    def take(self, live: LiveRequest, finish_reason: str = "abort") -> bool:
        """Mark live ended; True for exactly one caller (who counts it in the vllm:* request series)."""
        with self.lock:
            if live.ended:
                return False
            live.ended = True
            if self.requests.get(live.request_id) is live:
                del self.requests[live.request_id]
        scheduled = live.scheduled_at or (live.arrival + live.timings.get("prefill_queue", 0.0))
        self.vllm.finished(
            FinishedRequest(
                arrival=live.arrival,
                finished=time.monotonic(),
                finish_reason=finish_reason,
                prompt_tokens=live.prompt_tokens,
                generation_tokens=live.num_generated,
                scheduled=scheduled,
                first_token=live.first_token_at or None,
                max_tokens=live.max_tokens,
            )
        )
        return True

    def end(self, live: LiveRequest, finish_reason: str, cause: str, notify: bool = True) -> None:
        """End early (abort, client gone): free everything; tell the proxy with a final Tokens message."""
        if not self.take(live, finish_reason):
            return
        self.metrics.aborted.labels(cause).inc()
        self.metrics.finished.labels(finish_reason).inc()
        self._release(live)
        if notify:
            self.rpc.send(
                live.identity,
                Tokens(
                    request_id=live.request_id,
                    token_ids=[],
                    finished=True,
                    finish_reason=finish_reason,
                    timings=self.final_timings(live),
                ),
            )

    def fail(
        self,
        live: LiveRequest,
        status: int,
        message: str,
        retryable: bool,
        cause: str,
        count_abort: bool = True,
    ) -> None:
        """End with an error: free everything; tell the proxy with an Error message."""
        if not self.take(live):
            return
        if count_abort:
            self.metrics.aborted.labels(cause).inc()
        self._release(live)
        self.reject(live.identity, live.request_id, status, message, retryable)

    def _release(self, live: LiveRequest) -> None:
        if live.mode == "disaggregated" and self.decode is not None:
            self.decode.release(live.request_id)
        else:
            self.loop.abort(live.request_id)


def _folder_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _build_core(config):
    from pdserve.engine.engine_core import EngineCore

    try:
        from pdserve.wire.tokenizer import load_tokenizer

        eos = frozenset(load_tokenizer(config.model.model).eos_token_ids)
    except Exception as exc:  # a checkpoint without tokenizer files still serves token ids
        log.warning("no tokenizer for EOS ids (%s); only stop_token_ids and max_tokens end requests", exc)
        eos = frozenset()
    return EngineCore(config, eos_token_ids=eos, emit_kv_events=True)
