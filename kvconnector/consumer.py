"""The decode node's side of the connector: listen, reserve blocks on request, receive and scatter KV.

    consumer = KVConsumer(config, kv_caches, on_reserve=..., on_free=..., on_complete=...)
    consumer.address                                   # (ip, port) the proxy hands to prefill nodes
on_reserve(request_id, num_tokens, block_hashes) -> (block_ids, num_cached_blocks): allocate blocks for prompt
blocks num_cached_blocks.. (the first num_cached_blocks are its own prefix hits); raise to refuse (the producer
gets an Abort with the message). on_complete(rid, True, timings) fires once every layer of every block landed:
the blocks are the node's now. On any failure (timeout, producer lost, abort, bad chunk) on_free(rid) and then
on_complete(rid, False, timings) fire, exactly once.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Optional, Sequence

from kvconnector import link as links
from kvconnector.connector import ConnectorConfig, Endpoint, OnComplete, OnFree
from kvconnector.scheduler_side import ConsumerScheduler, Finished
from kvconnector.wire import Abort, Done, Handshake, Heartbeat, KVChunk, Reserve, Reserved
from kvconnector.worker_side import ConsumerWorker

log = logging.getLogger(__name__)

OnReserve = Callable[[str, int, Sequence[bytes]], tuple[Sequence[int], int]]


class KVConsumer(Endpoint):
    role = "kv_consumer"

    def __init__(self, config: ConnectorConfig, kv_caches, on_reserve: OnReserve, on_free: OnFree,
                 on_complete: Optional[OnComplete] = None, registry=None):
        super().__init__(config, kv_caches, on_free, on_complete, registry)
        self.on_reserve = on_reserve
        self.scheduler = ConsumerScheduler(config.num_layers, config.timeout)
        self.worker = ConsumerWorker(self.caches, full=kv_caches if hasattr(kv_caches, "dim") else None)
        self._bytes: dict[str, int] = defaultdict(int)
        self.listener = links.Listener(config.kv_ip, config.kv_port, self.codec, self._on_message,
                                       self._on_close, self._on_drop)
        self.address = self.listener.address
        self._reaper.start()
        log.info("KV consumer %s listening on %s:%d (%s)", config.engine_id, *self.address, config.kv_connector)

    def links(self):
        return list(self.listener.links)

    # ------------------------------------------------------------------------------------------------ messages

    def _on_message(self, link, msg, body) -> None:
        if isinstance(msg, Handshake):
            self._on_handshake(link, msg)
        elif link.peer is None:
            self._on_drop(link, "schema")
            link.close(f"{type(msg).__name__} before the handshake")
        elif isinstance(msg, KVChunk):
            try:
                self.data_plane.receive(link, msg, body,
                                        deliver=lambda tensor: self._land(link, msg, tensor),
                                        fail=lambda exc: self._fail(msg.request_id, f"receive failed: {exc}"))
            except Exception as exc:  # the data plane's state with this peer is unknown now: drop the link
                log.exception("receiving a chunk of %s failed", msg.request_id)
                self._fail(msg.request_id, f"receive failed: {exc}")
                link.close(f"data plane failed: {exc}")
        elif isinstance(msg, Reserve):
            self._on_reserve(link, msg)
        elif isinstance(msg, Done):
            f = self.scheduler.complete_if_empty(msg.request_id)
            if f is not None:
                self._finish(f)
        elif isinstance(msg, Abort):
            f = self.scheduler.abort(msg.request_id, "remote_abort", msg.reason)
            if f is not None:
                self._finish(f)
        elif not isinstance(msg, Heartbeat):
            self._on_drop(link, "schema")

    def _on_handshake(self, link, theirs: Handshake) -> None:
        if link.peer is not None:
            self._on_drop(link, "schema")
            return
        why = self.check_peer(theirs)
        if why:
            log.error("refusing KV peer %s (%s): %s", theirs.engine_id, link.name, why)
            try:
                link.send(Handshake(**{**_fields(self.handshake), "accept": False, "error": why}))
            finally:
                link.close("handshake refused")
            return
        link.send(self.handshake)
        self.data_plane.open(link, self.handshake, theirs, producer=False)
        link.peer = theirs

    def _on_reserve(self, link, msg: Reserve) -> None:
        rid = msg.request_id
        if rid in self.scheduler.active():
            link.send(Abort(request_id=rid, reason="request id already has a reservation"))
            return
        try:
            block_ids, num_cached = self.on_reserve(rid, msg.num_tokens, msg.block_hashes)
            block_ids = [int(b) for b in block_ids]
        except Exception as exc:
            log.info("reservation of %s refused: %s", rid, exc)
            link.send(Abort(request_id=rid, reason=f"reserve refused: {exc}"))
            return
        self.scheduler.reserve(rid, link, block_ids)
        self.metrics.inflight.inc()
        link.send(Reserved(request_id=rid, block_ids=block_ids, num_cached_blocks=int(num_cached)))

    def _land(self, link, header: KVChunk, tensor) -> None:
        """Bytes of one chunk are here: check them against the reservation, scatter, count."""
        rid = header.request_id
        with self.scheduler.lock:
            why = self.scheduler.check_chunk(rid, header.first_layer, header.num_layers, header.block_ids)
            if why == "unknown or finished request":
                log.debug("chunk for %s ignored: %s", rid, why)
                return
            why = why or self.worker.check(header, tensor)
            if why:
                f = self.scheduler.abort(rid, "error", f"bad chunk: {why}")
            else:
                self.worker.scatter(header, tensor)
                nbytes = tensor.numel() * tensor.element_size()
                self._bytes[rid] += nbytes
                self.metrics.bytes_received.inc(nbytes)
                f = self.scheduler.landed(rid, header.first_layer, header.num_layers, header.block_ids)
        if f is not None:
            if not f.ok:
                self._send_abort(f)
            self._finish(f)

    def _fail(self, request_id: str, detail: str) -> None:
        f = self.scheduler.abort(request_id, "error", detail)
        if f is not None:
            self._send_abort(f)
            self._finish(f)

    def _on_close(self, link, why: str) -> None:
        self.data_plane.close_link(link)
        for f in self.scheduler.peer_lost(link, why):
            self._finish(f)

    def _finish(self, f: Finished) -> None:
        # The node hears first (its KV is ready: that is the exposed transfer), then the producer's Done.
        self._notify(f, self._bytes.pop(f.request_id, 0), free=not f.ok)
        if f.ok and f.peer is not None and not f.peer.closed:
            try:
                f.peer.send(Done(request_id=f.request_id))
            except ConnectionError:
                pass

    def close(self) -> None:
        super().close()
        self.listener.close()


def _fields(msg) -> dict:
    return {name: getattr(msg, name) for name in msg.__struct_fields__}
