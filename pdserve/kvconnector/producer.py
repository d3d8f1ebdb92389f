"""The prefill node's side of the connector: bind the decode node's reserved blocks, write KV layer by layer.

    producer = KVProducer(config, kv_caches, on_complete=...)
    producer.bind(rid, decode_kv_address, num_tokens, block_ids, num_cached_blocks)   # no round trip after a
                                                                                        # first handshake
    # each engine step that runs rid (chunked prefill: several):
    producer.start_step([StepProgress(rid, num_computed_tokens_after_step, block_table, prompt_done)])
    for layer in range(L):  ... forward layer ...;  producer.save_layer(layer)
    producer.end_step()
on_complete(rid, ok, timings) fires exactly once: ok once the fence after the request's last write completed
(the consumer then gets `Done`); not ok after a failure, once nothing more can be written for rid (the
consumer gets `Abort` at that moment, so it may free the blocks). abort(rid) works at any point.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from pdserve.kvconnector import link as links
from pdserve.kvconnector.connector import ConnectorConfig, KVConnectorBase, OnComplete
from pdserve.kvconnector.scheduler_side import Finished, ProducerScheduler, SendPlan
from pdserve.kvconnector.worker_side import ProducerWorker
from pdserve.wire.frames import Abort, Done, Handshake, Heartbeat, LayoutMismatch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepProgress:
    request_id: str
    num_computed_tokens: int  # after this step
    block_ids: Sequence[int]  # the request's local block table
    prompt_done: bool  # this step computes the prompt's last token


class KVProducer(KVConnectorBase):
    role = "kv_producer"

    def __init__(
        self, config: ConnectorConfig, kv_caches, on_complete: Optional[OnComplete] = None, registry=None
    ):
        super().__init__(config, kv_caches, on_complete, registry)
        self.scheduler = ProducerScheduler(
            config.block_size, config.timeout, layer_windows=config.layer_windows
        )
        self.worker = ProducerWorker(
            self.data_plane,
            on_landed=self._landed,
            on_first_write=lambda rid: self.scheduler.progress(rid, "first_send"),
            on_failed=self._write_failed,
            layer_windows=config.layer_windows,
        )
        self._links: dict[tuple[str, int], links.Link] = {}
        # one lock per consumer address: a peer that is slow to answer its handshake holds up only the
        # requests bound for it, not connects to every other decode node
        self._connect_locks: dict[tuple[str, int], threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._reaper.start()

    def links(self):
        return list(self._links.values())

    # ------------------------------------------------------------------------------------------------ connect

    def connect(self, address: tuple[str, int]) -> links.Link:
        """The handshaken link to a consumer (made once per address). Raises LayoutMismatch when refused."""
        address = (address[0], int(address[1]))
        with self._locks_lock:
            lock = self._connect_locks.setdefault(address, threading.Lock())
        with lock:
            link = self._links.get(address)
            if link is not None and not link.closed:
                return link
            link = links.connect(
                address,
                self.codec,
                self._on_message,
                self._on_close,
                self._on_drop,
                timeout=self.config.timeout,
            )
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

    # ----------------------------------------------------------------------------------------------- requests

    def bind(
        self,
        request_id: str,
        address: tuple[str, int],
        num_tokens: int,
        block_ids: Sequence[int],
        num_cached_blocks: int,
    ) -> None:
        """Write rid's prompt blocks num_cached_blocks.. into the consumer's blocks block_ids as they are
        computed. Raises (ConnectionError, LayoutMismatch, TimeoutError, ValueError) when that cannot
        start."""
        link = self.connect(address)
        self.scheduler.bind(request_id, link, num_tokens, [int(b) for b in block_ids], int(num_cached_blocks))
        self.metrics.inflight.inc()

    def begin_step(self) -> None:
        """Before every forward of the engine, transferring or not (see DataPlane.begin_step)."""
        self.data_plane.begin_step()

    def start_step(self, progress: Iterable[StepProgress]) -> list[SendPlan]:
        """Before a step's forward: which blocks of the listed requests become final in it."""
        progress = list(progress)
        self.worker.begin_planning(p.request_id for p in progress)
        plans = []
        for p in progress:
            plan = self.scheduler.plan(p.request_id, p.num_computed_tokens, list(p.block_ids), p.prompt_done)
            if plan is not None:
                plans.append(plan)
        self.worker.start_step(plans)
        return plans

    def save_layer(self, layer: int) -> None:
        self.worker.save_layer(layer)

    def end_step(self, ok: bool = True) -> None:
        """After the forward. ok False (it raised part way): the step's requests lose layers they will never
        get again, so they fail, once nothing more can be written for them."""
        for plan in self.worker.step_plans if ok else ():
            if plan.last:  # its last copies are queued: the inactivity timeout restarts from here
                self.scheduler.progress(plan.request_id)
        failed = [] if ok else [p.request_id for p in self.worker.step_plans]
        self.worker.end_step(ok)
        for rid in failed:
            self.abort(rid, "the forward failed during the transfer")

    # ------------------------------------------------------------------------------------------------ ends

    def _landed(self, request_id: str, exposed_s: Optional[float], last_layer: float) -> None:
        """Completion thread: the fence after rid's last write completed."""
        f = self.scheduler.done(request_id)
        if f is None:
            return  # aborted meanwhile: its own end runs
        f.timings.setdefault("last_layer", last_layer)
        nbytes = self._nbytes(f)
        self.metrics.bytes_sent.inc(nbytes)
        if exposed_s is not None:
            f.timings["exposed_gpu_s"] = exposed_s
        try:
            f.peer.send(Done(request_id=request_id, nbytes=nbytes))
        except ConnectionError as exc:  # the consumer is gone; its node learns that on its own
            log.debug("Done for %s not sent: %s", request_id, exc)
        self._notify(f, nbytes)

    def _write_failed(self, request_id: str) -> None:
        """Completion thread: a write before rid's last fence did not land; it fails like an abort."""
        f = self.scheduler.abort(request_id, "error", "a KV write did not land")
        if f is not None:
            self._end_failed(f)

    def _end_failed(self, f: Finished) -> None:
        """After every write already issued for the request: tell the consumer (it may free now), then us."""

        def ended(_fence) -> None:
            self._send_abort(f)
            self._notify(f, 0)

        self.worker.after_writes(f.request_id, f.peer, ended)

    def _nbytes(self, f: Finished) -> int:
        """Bytes written: (layer, block) pieces, fewer than blocks x layers where sliding layers skip some."""
        pieces = f.timings.get("pieces", f.timings.get("blocks", 0) * self.config.num_layers)
        return pieces * self.block_bytes

    # ------------------------------------------------------------------------------------------------ events

    def _on_message(self, link, msg, body) -> None:
        if isinstance(msg, Handshake):
            fut = link.state.get("handshake")
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif link.peer is None:
            self._on_drop(link, "schema")
            link.close(f"{type(msg).__name__} before the handshake")
        elif isinstance(msg, Abort):
            f = self.scheduler.abort(msg.request_id, "remote_abort", msg.reason)
            if f is not None:
                self._end_failed(f)
        elif not isinstance(msg, Heartbeat):
            self._on_drop(link, "schema")

    def _on_close(self, link, why: str) -> None:
        for address, known in list(self._links.items()):
            if known is link:
                self._links.pop(address, None)
        fut = link.state.get("handshake")
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionError(f"link closed during the handshake: {why}"))
        self.data_plane.close_link(link)
        for f in self.scheduler.peer_lost(link, why):
            self._end_failed(f)

    def close(self) -> None:
        super().close()
        self.worker.close()
