"""One choice of one request on the nodes: route, send, relay, re-route before the first token, abort.

`ChoiceRun.send_first()` routes a prompt (prefix index + router) and sends `Generate` to the decode node;
`ChoiceRun.next()` yields the node's `Tokens` messages in order. It hides what can be retried:
- a retryable `Error` before the first token (the prefill node died, a queue was full): the request is re-sent
  under a new id (`<id>.r<k>`) to another pair, the failed prefill node (and, for a full or colocated decode
  node, that node) excluded; with no prefill node left it falls back to colocated on a decode node;
- a node declared dead (missed heartbeats) before the first token: the same, when it was the prefill node;
- an unreachable decode node at send time: the same, excluding it.
What cannot be retried becomes an `APIError` with the node's status (the decode node died mid-stream: 503;
the deadline passed: 504, and the node is told to abort). Every end (finish, error, abort) releases the
choice's per-node counters exactly once, and an abort always reaches the decode node, which frees blocks on
both nodes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Optional

from pdserve.proxy.config import ProxyConfig
from pdserve.proxy.errors import APIError
from pdserve.proxy.metrics import ProxyMetrics
from pdserve.proxy.node_rpc import NodeRpc, NodeUnreachable
from pdserve.proxy.nodes import NodeRegistry, NodeState
from pdserve.proxy.prefix_index import PrefixIndex
from pdserve.proxy.router import Decision, NoRoute, Router
from pdserve.wire.frames import FrameTooLarge
from pdserve.wire.hashing import external_block_hash, hash_prompt_blocks
from pdserve.wire.node_messages import Error, Generate, LogprobEntry, PromptLogprobs, Tokens, logprob_entry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeLost:
    node_id: str


_DEADLINE = object()  # queued by a run's deadline timer


class PromptRecords:
    """One node request's prompt logprob records by prompt position (position 0 has none), from pieces that
    must come in order, all before its first token."""

    def __init__(self) -> None:
        self.entries: list[Optional[LogprobEntry]] = [None]

    def add(self, msg: PromptLogprobs) -> None:
        if msg.start != len(self.entries):
            raise APIError(502, f"prompt logprobs out of order: {msg.start} after {len(self.entries) - 1}")
        try:
            self.entries.extend(logprob_entry(raw) for raw in msg.entries)
        except ValueError as exc:
            raise APIError(502, f"a bad prompt logprob record: {exc}", code="node_error") from None


def prompt_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None = None) -> list[int]:
    """The index keys of a prompt's full blocks (the chain the engine's prefix cache hashes, salted alike)."""
    return [external_block_hash(h) for h in hash_prompt_blocks(token_ids, block_size, cache_salt=cache_salt)]


def _tokens_to_compute(decision: Decision, prompt_tokens: int) -> int:
    """The prompt tokens the decision's prefill node will compute: those it did not hold when routed."""
    held = decision.terms.prefill_hit_tokens if decision.terms is not None else 0
    return max(prompt_tokens - held, 1)


class Dispatcher:
    def __init__(
        self,
        config: ProxyConfig,
        registry: NodeRegistry,
        index: PrefixIndex,
        router: Router,
        rpc: NodeRpc,
        metrics: ProxyMetrics,
    ):
        self.config, self.registry, self.index, self.router = config, registry, index, router
        self.rpc, self.metrics = rpc, metrics
        self.inflight: dict[str, "ChoiceRun"] = {}  # current node request id -> run
        registry.on_dead.append(self._node_dead)

    def _node_dead(self, node: NodeState) -> None:
        self.metrics.nodes_dead.inc()
        for rid, run in list(self.inflight.items()):
            if run.uses(node):
                self.rpc.deliver(rid, NodeLost(node.node_id))

    async def route(self, prompt: list[int], exclude: set[str], cache_salt: str | None = None) -> Decision:
        block_size = self.registry.block_size()
        if block_size is None:
            raise APIError(
                503,
                "no live node can serve this request (no node has sent a heartbeat; are the "
                "--node endpoints and --kv-secret right?)",
                code="no_live_node",
            )
        prefillers, decoders = self.registry.prefillers(), self.registry.decoders()
        hits: dict[str, int] = {}
        if self.router.config.policy == "cache_aware":
            live = [n.node_id for n in prefillers + decoders]
            hits = await self.index.match(prompt_block_hashes(prompt, block_size, cache_salt), live)
        decision = self.router.decide(len(prompt), hits, block_size, prefillers, decoders, exclude)
        self.metrics.decisions.labels(self.router.config.policy, decision.mode, decision.reason).inc()
        if self.router.config.log_decisions:
            log.info("route: %d prompt tokens, hits %s -> %s", len(prompt), hits or "{}", decision.describe())
        return decision

    def new_run(self, request_id: str, prompt: list[int], params: dict, deadline: float) -> "ChoiceRun":
        """A run not yet sent: `await run.send_first()` routes and sends it."""
        return ChoiceRun(self, request_id, prompt, params, deadline)


class ChoiceRun:
    def __init__(
        self, dispatcher: Dispatcher, request_id: str, prompt: list[int], params: dict, deadline: float
    ):
        self.d = dispatcher
        self.base_id = request_id
        self.node_rid = request_id
        self.prompt = prompt
        self.params = params
        self.deadline = deadline  # monotonic
        self.decision: Optional[Decision] = None
        self.attempt = 0
        self.excluded: set[str] = set()
        self.got_tokens = False
        self.ended = False
        self.first_token_at: Optional[float] = None
        self.queue: Optional[asyncio.Queue] = None
        self._holds_prefill = False
        self._prefill_tokens = 0  # what _attach added to its prefill node's pending_prefill_tokens
        self.prompt_records = PromptRecords()  # when params ask for prompt_logprobs

    def uses(self, node: NodeState) -> bool:
        dec = self.decision
        return dec is not None and (dec.decode is node or dec.prefill is node)

    @property
    def route_label(self) -> str:
        dec = self.decision
        if dec is None:
            return "-"
        return (
            f"{dec.mode}:{dec.prefill.node_id if dec.prefill else dec.decode.node_id}->{dec.decode.node_id}"
        )

    # ---- sending -------------------------------------------------------------------------------------------
    async def send_first(self) -> None:
        try:
            decision = await self.d.route(self.prompt, self.excluded, self.params.get("cache_salt"))
        except NoRoute as exc:
            raise APIError(503, f"no live node can serve this request: {exc}", code="no_live_node") from None
        await self._send(decision)

    async def _send(self, decision: Decision) -> None:
        while True:
            self._attach(decision)
            remaining = max(self.deadline - time.monotonic(), 0.001)
            msg = Generate(
                request_id=self.node_rid,
                prompt_token_ids=self.prompt,
                params=self.params,
                mode=decision.mode,
                prefill_rpc=decision.prefill.rpc if decision.prefill else "",
                deadline_s=remaining,
            )
            try:
                await self.d.rpc.send(decision.decode.rpc, msg)
                return
            except FrameTooLarge as exc:  # the request itself is too big to carry: no node could take it
                self._detach()
                self.ended = True
                raise APIError(
                    413, f"the request is too large for the node wire ({exc})", code="request_too_large"
                ) from None
            except NodeUnreachable as exc:
                self._detach()
                decision = await self._reroute(
                    "unreachable",
                    exclude=[decision.decode],
                    error=APIError(503, str(exc), code="node_unreachable"),
                )

    def _attach(self, decision: Decision) -> None:
        self.decision = decision
        self.node_rid = self.base_id if self.attempt == 0 else f"{self.base_id}.r{self.attempt}"
        self.prompt_records = PromptRecords()  # a retry computes them again
        self.queue = self.d.rpc.open(self.node_rid)
        self.d.inflight[self.node_rid] = self
        self._prefill_tokens = _tokens_to_compute(decision, len(self.prompt))
        decision.prefill_node.pending_prefill += 1
        decision.prefill_node.pending_prefill_tokens += self._prefill_tokens
        decision.decode.active += 1
        self._holds_prefill = True

    def _release_prefill(self) -> None:
        if self._holds_prefill and self.decision is not None:
            self._holds_prefill = False
            node = self.decision.prefill_node
            node.pending_prefill = max(node.pending_prefill - 1, 0)
            node.pending_prefill_tokens = max(node.pending_prefill_tokens - self._prefill_tokens, 0)

    def _detach(self) -> None:
        """Stop listening for the current node request id and release its counters."""
        self._release_prefill()
        if self.decision is not None:
            self.decision.decode.active = max(self.decision.decode.active - 1, 0)
        self.d.rpc.close(self.node_rid)
        self.d.inflight.pop(self.node_rid, None)

    async def _reroute(self, reason: str, exclude: list[NodeState], error: APIError) -> Decision:
        if self.attempt >= self.d.config.max_retries:
            self.ended = True
            raise error
        self.excluded.update(n.node_id for n in exclude)
        try:
            decision = await self.d.route(self.prompt, self.excluded, self.params.get("cache_salt"))
        except (NoRoute, APIError):
            self.ended = True
            raise error from None
        self.attempt += 1
        self.d.metrics.retries.labels(reason).inc()
        log.warning(
            "request %s: %s (%s); re-sending as %s.r%d",
            self.base_id,
            reason,
            error.message,
            self.base_id,
            self.attempt,
        )
        return decision

    # ---- receiving -----------------------------------------------------------------------------------------
    async def next(self) -> Tokens:
        """The next Tokens message; raises APIError for an error that cannot be retried."""
        while True:
            if self.ended:  # aborted (client gone, stop string) while a reader still waited
                raise APIError(499, "the request was aborted", code="aborted")
            item = await self._get_before_deadline()
            if item is _DEADLINE:
                self.abort("timeout")
                raise APIError(
                    504,
                    f"the request did not finish within {self.d.config.request_timeout_s:g}s",
                    code="timeout",
                )
            if isinstance(item, PromptLogprobs):
                self._prompt_records(item)
                continue
            if isinstance(item, Tokens):
                if item.token_ids and not self.got_tokens:
                    self._check_prompt_records()
                    self.got_tokens = True
                    self.first_token_at = time.monotonic()
                    self._release_prefill()
                if item.finished:
                    self._end()
                return item
            if isinstance(item, Error):
                await self._on_error(item)
            elif isinstance(item, NodeLost):
                await self._on_node_lost(item.node_id)

    def _prompt_records(self, msg: PromptLogprobs) -> None:
        try:
            self.prompt_records.add(msg)
        except APIError:
            self.abort("error")
            raise

    def _check_prompt_records(self) -> None:
        """The node sends every record before the first token; fewer would answer with holes."""
        asked = self.params.get("prompt_logprobs") is not None
        if asked and len(self.prompt_records.entries) != len(self.prompt):
            self.abort("error")
            raise APIError(502, "the node sent incomplete prompt logprobs", code="node_error")

    async def _get_before_deadline(self):
        """The next queued item, or _DEADLINE. Not asyncio.wait_for: on Python 3.11 it swallows a cancellation
        that lands in the iteration the queue.get() completes, and a client that left then went unnoticed (its
        node generated to max_tokens). A timer that queues a marker keeps cancellation with the plain
        await."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return _DEADLINE
        queue = self.queue
        timer = asyncio.get_running_loop().call_later(remaining, queue.put_nowait, _DEADLINE)
        try:
            return await queue.get()
        finally:
            timer.cancel()

    async def _on_error(self, err: Error) -> None:
        self.d.metrics.node_errors.labels(str(err.status)).inc()
        error = APIError(err.status, f"{err.message}", code="node_error")
        dec = self.decision
        if not err.retryable or self.got_tokens:
            self._end()
            raise error
        exclude = []
        if err.node_draining:  # the decode node is shutting down (its heartbeat may still be on the way)
            dec.decode.draining = True
            exclude.append(dec.decode)
        else:
            if dec.mode == "disaggregated":
                exclude.append(dec.prefill)
            if dec.mode == "colocated" or err.status == 429:
                exclude.append(dec.decode)
        self._detach()
        decision = await self._reroute(f"node_error_{err.status}", exclude, error)
        await self._send(decision)

    async def _on_node_lost(self, node_id: str) -> None:
        dec = self.decision
        if dec.decode.node_id == node_id:
            # Declared dead on silence, it may still be alive and generating for nobody: tell it to stop.
            self.d.rpc.abort_soon(dec.decode.rpc, self.node_rid, "decode node declared dead")
            self._detach()
            if not self.got_tokens:
                decision = await self._reroute(
                    "decode_node_lost",
                    [dec.decode],
                    APIError(503, f"decode node {node_id} stopped responding", code="node_lost"),
                )
                await self._send(decision)
                return
            self.ended = True
            raise APIError(503, f"decode node {node_id} stopped responding mid-request", code="node_lost")
        if dec.prefill is not None and dec.prefill.node_id == node_id and not self.got_tokens:
            self.d.rpc.abort_soon(dec.decode.rpc, self.node_rid, "prefill node lost")
            self._detach()
            decision = await self._reroute(
                "prefill_node_lost",
                [dec.prefill],
                APIError(503, f"prefill node {node_id} stopped responding", code="node_lost"),
            )
            await self._send(decision)

    # ---- ending --------------------------------------------------------------------------------------------
    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self._detach()

    def abort(self, reason: str) -> None:
        """Tell the decode node to drop the request (it frees blocks on both nodes); idempotent."""
        if self.ended:
            return
        self.d.metrics.aborts.labels(reason).inc()
        if self.decision is not None:
            self.d.rpc.abort_soon(self.decision.decode.rpc, self.node_rid, reason)
        self._end()
