"""The decode node's side of the connector: listen, export the cache to authenticated producers, complete on
Done.

    consumer = KVConsumer(config, kv_caches, on_complete=...)
    consumer.address                       # (ip, port) the decode node hands to prefill nodes with its blocks
    consumer.expect(rid, block_ids)        # before asking a prefill node: these blocks will be written
    consumer.forget(rid)                   # the node gave up on rid (it frees the blocks once the producer is
                                           done)
on_complete(rid, True, timings) fires on the producer's Done: every layer of every block landed, the blocks
are the node's now. on_complete(rid, False, timings) fires when the producer aborted (it has fenced its
writes, so the blocks may be freed) or a tcp chunk was bad. Either fires at most once; never after
forget(rid).

Per layer the consumer's host does nothing on a one-sided plane (cuda_ipc); over tcp its link thread writes
each chunk into the reserved blocks after checking them against the reservation.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Optional, Sequence

from pdserve.kvconnector import link as links
from pdserve.kvconnector.connector import ConnectorConfig, KVConnectorBase, OnComplete
from pdserve.kvconnector.scheduler_side import ConsumerScheduler, Finished
from pdserve.kvconnector.worker_side import ConsumerWorker
from pdserve.wire.frames import Abort, Done, Handshake, Heartbeat, KVChunk

log = logging.getLogger(__name__)


class KVConsumer(KVConnectorBase):
    role = "kv_consumer"

    def __init__(
        self, config: ConnectorConfig, kv_caches, on_complete: Optional[OnComplete] = None, registry=None
    ):
        super().__init__(config, kv_caches, on_complete, registry)
        self.scheduler = ConsumerScheduler(config.num_layers, config.timeout)
        self.worker = ConsumerWorker(self.layout)
        self.counted = self.data_plane.name == "tcp"  # the bytes pass through us, so Done can be checked
        # (request_id): the producer's Done or Abort for a request forgotten here: its writes are over
        self.on_forgotten_end: Optional[Callable[[str], None]] = None
        self._bytes: dict[str, int] = defaultdict(int)
        self.handshake.data_plane = self.data_plane.local_info()
        self.listener = links.Listener(
            config.kv_ip, config.kv_port, self.codec, self._on_message, self._on_close, self._on_drop
        )
        self.address = self.listener.address
        self._reaper.start()
        log.info(
            "KV consumer %s listening on %s:%d (%s)", config.engine_id, *self.address, config.kv_connector
        )

    def links(self):
        return list(self.listener.links)

    # ----------------------------------------------------------------------------------------------- requests

    def expect(self, request_id: str, block_ids: Sequence[int], layer_skips: Sequence[int] = ()) -> None:
        """rid's uncached prompt blocks will be written into block_ids, but for the leading layer_skips[l] of
        them in sliding layer l (raises ValueError on a bad reservation)."""
        self.scheduler.reserve(request_id, [int(b) for b in block_ids], layer_skips)
        self.metrics.inflight.inc()

    def forget(self, request_id: str, reason: str = "ended on the decode node") -> bool:
        """Stop expecting rid (no callback follows). False when it had already completed or failed."""
        f = self.scheduler.abort(request_id, "abort", reason)
        if f is None:
            return False
        self.metrics.inflight.dec()
        self.metrics.failure("abort")
        self._bytes.pop(request_id, None)
        return True

    def _end_failed(self, f: Finished) -> None:
        self._notify(f, self._bytes.pop(f.request_id, 0))

    # ----------------------------------------------------------------------------------------------- messages

    def _on_message(self, link, msg, body) -> None:
        if isinstance(msg, Handshake):
            self._on_handshake(link, msg)
        elif link.peer is None:
            self._on_drop(link, "schema")
            link.close(f"{type(msg).__name__} before the handshake")
        elif isinstance(msg, KVChunk):
            self._on_chunk(link, msg, body)
        elif isinstance(msg, Done):
            f = self.scheduler.done(msg.request_id, self.counted)
            if f is None:
                self._forgotten_end(msg.request_id)
            else:
                nbytes = self._bytes.pop(f.request_id, 0) if self.counted else msg.nbytes
                self.metrics.bytes_received.inc(nbytes)
                self._notify(f, nbytes)
        elif isinstance(msg, Abort):
            f = self.scheduler.abort(msg.request_id, "remote_abort", msg.reason)
            if f is None:
                self._forgotten_end(msg.request_id)
            else:
                self._end_failed(f)
        elif not isinstance(msg, Heartbeat):
            self._on_drop(link, "schema")

    def _forgotten_end(self, request_id: str) -> None:
        if self.on_forgotten_end is not None:
            try:
                self.on_forgotten_end(request_id)
            except Exception:
                log.exception("on_forgotten_end(%s) failed", request_id)

    def _on_handshake(self, link, theirs: Handshake) -> None:
        if link.peer is not None:
            self._on_drop(link, "schema")
            return
        why = self.check_peer(theirs)
        if why:
            log.error("refusing KV peer %s (%s): %s", theirs.engine_id, link.name, why)
            refusal = Handshake(
                **{**_fields(self.handshake), "data_plane": {}, "accept": False, "error": why}
            )
            try:
                link.send(refusal)
            finally:
                link.close("handshake refused")
            return
        # Only now, to a peer whose frame carried a valid MAC, does our exported cache leave this process.
        link.send(self.handshake)
        self.data_plane.open(link, self.handshake, theirs, producer=False)
        link.peer = theirs

    def _on_chunk(self, link, header: KVChunk, body) -> None:
        """tcp: one chunk's bytes; check them against the reservation, write them into the cache, count."""
        rid = header.request_id
        try:
            tensor = self.data_plane.receive(header, body)
        except (TypeError, ValueError) as exc:
            self._on_drop(link, "schema")
            link.close(f"bad chunk: {exc}")
            return
        with self.scheduler.lock:
            why = self.scheduler.check_chunk(rid, header.first_layer, header.num_layers, header.block_ids)
            if why == "unknown or finished request":
                log.debug("chunk for %s ignored: %s", rid, why)
                return
            why = why or self.worker.check(header, tensor)
            if not why:
                self.worker.write(header, tensor)
                self._bytes[rid] += tensor.numel() * tensor.element_size()
                self.scheduler.landed(rid, header.first_layer, header.num_layers, header.block_ids)
                return
            f = self.scheduler.abort(rid, "error", f"bad chunk: {why}")
        if f is not None:
            try:
                link.send(Abort(request_id=rid, reason=f"bad chunk: {why}"))
            except ConnectionError:
                pass
            self._end_failed(f)

    def _on_close(self, link, why: str) -> None:
        self.data_plane.close_link(link)

    def close(self) -> None:
        super().close()
        self.listener.close()


def _fields(msg) -> dict:
    return {name: getattr(msg, name) for name in msg.__struct_fields__}
