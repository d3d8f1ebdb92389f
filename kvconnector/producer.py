"""The prefill node's side of the connector: reserve on a decode node, then push KV layer by layer.

    producer = KVProducer(config, kv_caches, on_free=..., on_complete=...)
    res = producer.reserve(rid, decode_addr, num_tokens, block_hashes).result()   # Reservation
    # each engine step that runs rid (chunked prefill: several):
    producer.start_step([StepProgress(rid, num_computed_tokens_after_step, block_table, prompt_done)])
    for layer in range(L):  ... forward layer ...;  producer.save_layer(layer)
    producer.end_step()
on_free(rid) fires once the connector no longer needs rid's blocks (after the consumer's Done, or on any
failure); on_complete(rid, ok, timings) fires exactly once. abort(rid) works at any point.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from kvconnector import link as links
from kvconnector.connector import ConnectorConfig, Endpoint, OnComplete, OnFree
from kvconnector.scheduler_side import Finished, ProducerScheduler, SendPlan
from kvconnector.wire import Abort, Done, Handshake, Heartbeat, LayoutMismatch, Reserve, Reserved
from kvconnector.worker_side import ProducerWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    block_ids: list[int]  # the consumer's blocks for prompt blocks num_cached_blocks..
    num_cached_blocks: int  # prompt blocks the consumer already holds (not sent)


@dataclass(frozen=True, slots=True)
class StepProgress:
    request_id: str
    num_computed_tokens: int  # after this step
    block_ids: Sequence[int]  # the request's local block table
    prompt_done: bool  # this step computes the prompt's last token


class KVProducer(Endpoint):
    role = "kv_producer"

    def __init__(self, config: ConnectorConfig, kv_caches, on_free: OnFree, on_complete: Optional[OnComplete] = None,
                 registry=None):
        super().__init__(config, kv_caches, on_free, on_complete, registry)
        self.scheduler = ProducerScheduler(config.block_size, config.timeout)
        self.worker = ProducerWorker(self.caches, self.data_plane, link_of=lambda link: link,
                                     is_active=self.scheduler.is_active, on_progress=self._progress,
                                     on_all_sent=lambda rid, n: self.scheduler.all_sent(rid),
                                     max_inflight=1 if config.kv_connector == "tcp" else config.max_inflight)
        self._links: dict[tuple[str, int], links.Link] = {}
        self._connect_lock = threading.Lock()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._bytes: dict[str, int] = defaultdict(int)
        self._reaper.start()

    def links(self):
        return list(self._links.values())

    # ------------------------------------------------------------------------------------------------ connect

    def connect(self, address: tuple[str, int]) -> links.Link:
        """The handshaken link to a consumer (made once per address). Raises LayoutMismatch when refused."""
        address = (address[0], int(address[1]))
        with self._connect_lock:
            link = self._links.get(address)
            if link is not None and not link.closed:
                return link
            link = links.connect(address, self.codec, self._on_message, self._on_close, self._on_drop,
                                 timeout=self.config.timeout)
            link.state["handshake"] = concurrent.futures.Future()
            try:
                link.send(self.handshake)
                theirs: Handshake = link.state["handshake"].result(self.config.timeout)
                if not theirs.accept:
                    raise LayoutMismatch(f"consumer {theirs.engine_id} at {address} refused: {theirs.error}")
                why = self.check_peer(theirs)
                if why:
                    raise LayoutMismatch(why)
                self.data_plane.open(link, self.handshake, theirs, producer=True)
            except BaseException as exc:
                link.close(f"handshake failed: {exc}")
                if isinstance(exc, concurrent.futures.TimeoutError):
                    raise TimeoutError(f"no handshake from {address} in {self.config.timeout}s") from None
                raise
            link.peer = theirs
            self._links[address] = link
            return link

    # ------------------------------------------------------------------------------------------------ requests

    def reserve(self, request_id: str, address: tuple[str, int], num_tokens: int,
                block_hashes: Iterable[bytes] = ()) -> "concurrent.futures.Future[Reservation]":
        """Ask the consumer at address to hold blocks for the prompt. The future fails if it refuses or times out
        (the request is then finished: on_free and on_complete have fired)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        link = self.connect(address)
        self.scheduler.add(request_id, link, num_tokens)
        self.metrics.inflight.inc()
        self._pending[request_id] = future
        try:
            link.send(Reserve(request_id=request_id, num_tokens=num_tokens, block_hashes=list(block_hashes)))
        except ConnectionError as exc:
            f = self.scheduler.abort(request_id, "peer_lost", str(exc))
            if f is not None:
                self._finish(f)
        return future

    def start_step(self, progress: Iterable[StepProgress]) -> list[SendPlan]:
        """Before a step's forward: which blocks of the listed requests become final in it; binds them."""
        plans = []
        for p in progress:
            plan = self.scheduler.plan(p.request_id, p.num_computed_tokens, list(p.block_ids), p.prompt_done)
            if plan is not None:
                plans.append(plan)
        self.worker.start_step(plans)
        return plans

    def save_layer(self, layer: int) -> None:
        self.worker.save_layer(layer)

    def end_step(self) -> None:
        self.worker.end_step()

    # ------------------------------------------------------------------------------------------------ events

    def _progress(self, request_id: str, mark: str, nbytes: int) -> None:
        if mark == "chunk":
            self._bytes[request_id] += nbytes
            self.metrics.bytes_sent.inc(nbytes)
            self.scheduler.progress(request_id)
        else:
            self.scheduler.progress(request_id, mark)

    def _on_message(self, link, msg, body) -> None:
        if isinstance(msg, Handshake):
            fut = link.state.get("handshake")
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif link.peer is None:
            self._on_drop(link, "schema")
            link.close(f"{type(msg).__name__} before the handshake")
        elif isinstance(msg, Reserved):
            f = self.scheduler.reserved(msg.request_id, msg.block_ids, msg.num_cached_blocks)
            fut = self._pending.pop(msg.request_id, None)
            if f is not None:
                self._send_abort(f)
                self._finish(f, fut)
            elif fut is not None and not fut.done():
                fut.set_result(Reservation(msg.request_id, list(msg.block_ids), msg.num_cached_blocks))
        elif isinstance(msg, Abort):
            f = self.scheduler.abort(msg.request_id, "remote_abort", msg.reason)
            if f is not None:
                self._finish(f)
        elif isinstance(msg, Done):
            f = self.scheduler.done(msg.request_id)
            if f is not None:
                self._finish(f)
        elif not isinstance(msg, Heartbeat):
            self._on_drop(link, "schema")

    def _on_close(self, link, why: str) -> None:
        for address, known in list(self._links.items()):
            if known is link:
                self._links.pop(address, None)
        fut = link.state.get("handshake")
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError(f"link closed during the handshake: {why}"))
        self.worker.drop_peer(link)
        self.data_plane.close_link(link)
        for f in self.scheduler.peer_lost(link, why):
            self._finish(f)

    def _finish(self, f: Finished, fut: Optional[concurrent.futures.Future] = None) -> None:
        fut = fut or self._pending.pop(f.request_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionAbortedError(f"reservation of {f.request_id} failed ({f.cause}): {f.detail}"))
        self._notify(f, self._bytes.pop(f.request_id, 0), free=True)

    def close(self) -> None:
        super().close()
        self.worker.close()
