"""The decode node's disaggregated path: reserve, drive the prefill node, receive KV, join the running batch.

One request, in order (docs/architecture.md, "A request's way"):
  1. `generate` (mode disaggregated) -> on the engine thread, reserve blocks for the prompt minus our own
     prefix hits (remote_admission.reserve); no room -> 429, retryable.
  2. `prefill` {prompt, params, our KV endpoint, the block ids, how many prompt blocks we already hold} goes
     to the prefill node's ROUTER through our DEALER to it: the one round trip. Its connector binds those
     blocks and writes each layer into them as it is computed (one-sided: nothing runs here per layer); its
     `Done` on the KV link says every layer landed.
  3. `first_token` from the prefill node is forwarded to the proxy at once (TTFT is the prefill's time), after
     the `prompt_logprobs` pieces the prefill node sent before it, when the request asked for them. If
     that token already ends the request (eos, stop id, max_tokens 1) the request ends here and the transfer
     is aborted.
  4. When every layer has landed AND the first token is known, the scheduler is told (WAITING_FOR_REMOTE_KVS
     -> ready) and moves the request into the running batch at the next step with a free slot; the engine loop
     streams the rest through the node's sink like a colocated request.
Failure before the request joins the batch (prefill node error, killed, silent past --kv-timeout, KV transfer
failed) sends the proxy an `error`, retryable while no token has reached the proxy. The reserved blocks are
freed only once the prefill node can no longer write them (a mapped cache is writable by the peer that mapped
it): after its `prefill_done` or its KV `Abort` (both sent after its writes are fenced), or once its
connection is lost; a request released before that waits in quarantine, at most QUARANTINE_TIMEOUTS x
--kv-timeout.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from pdserve.decode_node import remote_admission as ra
from pdserve.engine.engine_loop import Sink
from pdserve.wire.bind import advertised
from pdserve.wire.errors import PromptTooLongError
from pdserve.wire.node_messages import (
    Abort,
    Error,
    FirstToken,
    Prefill,
    PrefillDone,
    PromptLogprobs,
    Tokens,
    plain,
)

log = logging.getLogger(__name__)

QUARANTINE_TIMEOUTS = 3  # a released request's blocks wait this many --kv-timeout for the writer to confirm
# ...or this many once its prefill node's RPC connection is lost: a producer still alive behind a broken RPC
# connection stops writing by itself within its own --kv-timeout (no progress -> abort), so this is safe too
LOST_WRITER_TIMEOUTS = 1.5
KV_ID_SEPARATOR = "~kv-"  # request_id + this + a random part: the id the request's KV frames carry


def new_kv_request_id(request_id: str) -> str:
    """The id the request's KV frames will carry. Only the prefill node we ask learns it (in `Prefill`), so a
    Done, Abort or chunk from any other producer on our listener names no reservation and ends nothing."""
    return f"{request_id}{KV_ID_SEPARATOR}{secrets.token_hex(8)}"


@dataclass(eq=False)
class Pending:
    live: object  # node_server.LiveRequest
    prefill_rpc: str
    reservation: ra.Reservation
    deadline: float  # monotonic: the prefill node must show progress by then
    kv_id: str = ""  # the id its KV frames carry (new_kv_request_id)
    first_token: Optional[int] = None
    first_logprobs: object = None
    num_cached_tokens: int = 0
    tokens_sent: bool = False
    landed: bool = False
    landed_at: float = 0.0
    admitted: bool = False
    writer_done: bool = False  # the prefill node can no longer write into the reserved blocks
    released_at: float = 0.0  # the request ended here while the writer might still write (quarantine)
    writer_lost: bool = False  # the prefill node's RPC connection dropped: a shorter quarantine
    lock: threading.Lock = field(default_factory=threading.Lock)


class DisaggDecoder:
    def __init__(self, node):
        from pdserve.kvconnector.consumer import KVConsumer
        from pdserve.node_runtime.connector import connector_config, kv_layout

        self.node = node
        self.core, self.loop, self.rpc = node.core, node.loop, node.rpc
        self.timeout = node.options.kv_timeout
        self.pending: dict[str, Pending] = {}
        self.lock = threading.Lock()
        self.quarantine: dict[str, Pending] = {}  # released, blocks held until the writer confirms it stopped
        self.consumer = KVConsumer(connector_config(node), kv_layout(node), on_complete=self._on_kv_complete)
        self.consumer.on_forgotten_end = self._on_kv_end  # a released request's Done / Abort still frees it
        node.metrics.extra_registries.append(self.consumer.metrics.registry)
        self.kv_endpoint = advertised("%s:%d" % self.consumer.address)

    @property
    def num_pending(self) -> int:
        return len(self.pending)

    def close(self) -> None:
        self.consumer.close()

    # ---- 1-2: reserve and ask the prefill node -------------------------------------------------------------
    def generate(self, live, msg, params) -> None:
        future = self.loop.call(ra.reserve, self.core, live.request_id, msg.prompt_token_ids, params)
        future.add_done_callback(lambda f: self._reserved(live, msg, f))

    def _reserved(self, live, msg, future) -> None:
        exc = future.exception()
        if exc is not None:
            status = (
                429
                if isinstance(exc, ra.NoRoomError)
                else 400
                if isinstance(exc, (PromptTooLongError, ValueError))
                else 503
            )
            self.node.fail(
                live, status, str(exc), retryable=status != 400, cause="rejected", count_abort=False
            )
            return
        res: ra.Reservation = future.result()
        pending = Pending(live, msg.prefill_rpc, res, time.monotonic() + self.timeout)
        pending.kv_id = new_kv_request_id(live.request_id)
        with self.lock:
            self.pending[live.request_id] = pending
        if live.ended:  # aborted while we reserved: nobody was asked to write
            pending.writer_done = True
            self.release(live.request_id)
            return
        self.consumer.expect(pending.kv_id, res.block_ids, res.layer_skips)
        if live.ended:  # released while we registered: nobody has been asked to write yet
            pending.writer_done = True
            self.release(live.request_id)
            return
        self.rpc.send_to(
            msg.prefill_rpc,
            Prefill(
                request_id=live.request_id,
                prompt_token_ids=list(msg.prompt_token_ids),
                params=msg.params,
                kv_endpoint=self.kv_endpoint,
                block_ids=res.block_ids,
                num_cached_blocks=res.num_cached_blocks,
                kv_request_id=pending.kv_id,
                decode_node_id=self.node.node_id,
            ),
        )

    # ---- 3: the first token --------------------------------------------------------------------------------
    def on_prefill_message(self, endpoint: str, msg) -> None:
        if isinstance(msg, PrefillDone):
            if msg.ok and not self.consumer.counted:  # one-sided: its fence means landed, even if the KV link
                self._on_complete(
                    msg.request_id, True, {}
                )  # lost the Done (over tcp only the Done means that)
            self._writer_done(msg.request_id)
        with self.lock:
            pending = self.pending.get(msg.request_id)
        if pending is None:
            if isinstance(msg, FirstToken):  # we gave up on it: make sure the prefill node stops too
                self.rpc.send_to(endpoint, Abort(request_id=msg.request_id, reason="decode node gave up"))
            return
        if isinstance(msg, FirstToken):
            self._first_token(pending, msg)
        elif isinstance(msg, PromptLogprobs):  # computed by the prefill node; they reach the proxy before the
            if pending.first_token is None and not pending.live.ended:  # first token, in the order they came
                self.rpc.send(pending.live.identity, msg)
        elif isinstance(msg, Error):
            self._fail(pending, msg.status, f"prefill node: {msg.message}", msg.retryable, "prefill_failed")
        elif isinstance(msg, PrefillDone):
            pending.live.timings.update(
                {k: v for k, v in (msg.timings or {}).items() if k in ("transfer", "exposed_transfer")}
            )
            if not msg.ok:
                self._fail(pending, 503, f"prefill node's KV transfer failed ({msg.cause})", True, "kv")

    def _first_token(self, pending: Pending, msg: FirstToken) -> None:
        live = pending.live
        with pending.lock:
            if pending.first_token is not None or live.ended:
                return
            status = ra.first_token_stop(self.core, pending.reservation.request, msg.token)
            pending.first_token, pending.first_logprobs = msg.token, msg.logprobs
            pending.num_cached_tokens = msg.num_cached_tokens
            pending.deadline = time.monotonic() + self.timeout
        live.timings.update(
            {k: v for k, v in (msg.timings or {}).items() if k in ("prefill_queue", "prefill")}
        )
        finished = status is not None
        self.node.tokens_out(live, 1)
        if finished and not self.node.take(live, status.finish_reason):
            return
        pending.tokens_sent = True
        self.rpc.send(
            live.identity,
            Tokens(
                request_id=live.request_id,
                token_ids=[msg.token],
                logprobs=[plain(msg.logprobs)] if msg.logprobs is not None else None,
                finished=finished,
                finish_reason=status.finish_reason if finished else None,
                num_cached_tokens=msg.num_cached_tokens,
                timings=self.node.final_timings(live) if finished else None,
            ),
        )
        if finished:
            self.node.metrics.finished.labels(status.finish_reason).inc()
            self.release(live.request_id)
        elif pending.landed:
            self.loop.call(self._admit, pending)

    # ---- 4: KV landed -> the running batch -----------------------------------------------------------------
    def _request_of(self, kv_id: str) -> Optional[str]:
        """KV link thread: the request a KV frame's id names, if it is exactly the id we gave that request's
        prefill node (a guessed or stale one names nothing)."""
        rid = kv_id.rpartition(KV_ID_SEPARATOR)[0]
        with self.lock:
            pending = self.pending.get(rid) or self.quarantine.get(rid)
        return rid if pending is not None and secrets.compare_digest(pending.kv_id, kv_id) else None

    def _on_kv_end(self, kv_id: str) -> None:
        """The producer's Done or Abort for a request no longer expected here: its writes are over."""
        rid = self._request_of(kv_id)
        if rid is None:
            log.warning("KV end for %r ignored: no request here gave that id to its prefill node", kv_id)
            return
        self._writer_done(rid)

    def _on_kv_complete(self, kv_id: str, ok: bool, timings: dict) -> None:
        rid = self._request_of(kv_id)
        if rid is not None:
            self._on_complete(rid, ok, timings)

    def _on_complete(self, request_id: str, ok: bool, timings: dict) -> None:
        """KV link thread: the producer's Done (ok) or Abort (it has fenced its writes), or a bad tcp
        chunk."""
        self._writer_done(request_id)
        with self.lock:
            pending = self.pending.get(request_id)
        if pending is None:
            return
        if not ok:
            cause = timings.get("cause", "error")
            self._fail(
                pending,
                504 if cause == "timeout" else 503,
                f"KV transfer failed ({cause})",
                not pending.tokens_sent,
                "kv",
            )
            return
        with pending.lock:
            if pending.landed:
                return
            pending.landed, pending.landed_at = True, time.monotonic()
            ready = pending.first_token is not None
            pending.deadline = (
                pending.landed_at + self.timeout
            )  # the first token must follow within --kv-timeout
        if "transfer_s" in timings:
            pending.live.timings.setdefault("transfer", timings["transfer_s"])
        if ready:
            self.loop.call(self._admit, pending)

    def _admit(self, pending: Pending) -> None:
        """Loop thread: KV landed and first token known; the scheduler moves it into the batch when a slot
        frees."""
        live = pending.live
        if (
            pending.admitted
            or live.ended
            or not self.core.remote_kv_ready(live.request_id, pending.num_cached_tokens)
        ):
            return
        pending.admitted = True
        ready_at = time.monotonic()
        self.loop.attach(
            live.request_id,
            Sink(
                on_output=lambda out: self._on_output(live, out),
                on_fail=lambda why: self.node.fail(live, 503, why, retryable=False, cause="error"),
                on_scheduled=lambda t: live.timings.__setitem__("decode_queue", max(t - ready_at, 0.0)),
            ),
        )

    def _on_output(self, live, out) -> None:
        if out.finished:
            with self.lock:
                self.pending.pop(live.request_id, None)
        self.node.on_output(live, out)

    # ---- failures and the end ------------------------------------------------------------------------------
    def _fail(self, pending: Pending, status: int, message: str, retryable: bool, cause: str) -> None:
        if pending.admitted:
            return  # in the batch already: the engine owns it now
        self.node.fail(
            pending.live, status, message, retryable=retryable and not pending.tokens_sent, cause=cause
        )

    def release(self, request_id: str) -> None:
        """End of the request on this node, any state: stop the transfer, tell the prefill node, and free the
        blocks now if nothing can write them any more, else once the prefill node confirms (quarantine)."""
        with self.lock:
            pending = self.pending.pop(request_id, None)
            hold = pending is not None and not pending.writer_done and not pending.landed
            if hold:
                pending.released_at = time.monotonic()
                self.quarantine[request_id] = pending
        if pending is not None:
            self.consumer.forget(pending.kv_id)
        if pending is not None and not pending.landed:
            self.rpc.send_to(
                pending.prefill_rpc, Abort(request_id=request_id, reason="ended on the decode node")
            )
        if hold:
            self.loop.call(self._detach_on_loop, request_id)
        else:
            self.loop.call(self._release_on_loop, request_id)

    def _writer_done(self, request_id: str) -> None:
        """The prefill node will write nothing more for request_id: free it if it was waiting for that."""
        with self.lock:
            pending = self.pending.get(request_id)
            if pending is not None:
                pending.writer_done = True
            held = self.quarantine.pop(request_id, None)
        if held is not None:
            self.loop.call(self._release_on_loop, request_id)

    def _detach_on_loop(self, request_id: str) -> None:
        self.loop.detach(request_id)

    def _release_on_loop(self, request_id: str) -> None:
        self.loop.detach(request_id)
        ra.release(self.core, request_id)

    def check_timeouts(self, now: float) -> None:
        """RPC thread tick: a prefill node that shows no progress in --kv-timeout fails its requests; blocks
        in quarantine past their limit are freed (the writer never confirmed: logged, it is the trust
        boundary)."""
        with self.lock:
            late = [p for p in self.pending.values() if _waiting_on_prefill(p) and now > p.deadline]
            stale = [
                rid
                for rid, p in self.quarantine.items()
                if now - p.released_at
                > (LOST_WRITER_TIMEOUTS if p.writer_lost else QUARANTINE_TIMEOUTS) * self.timeout
            ]
        for pending in late:
            self._fail(
                pending,
                504,
                f"no answer from the prefill node {pending.prefill_rpc} in {self.timeout:.1f}s",
                True,
                "prefill_timeout",
            )
        for rid in stale:
            log.warning("freeing the blocks of %s: its prefill node never confirmed it stopped writing", rid)
            self._writer_done(rid)

    def on_prefill_node_lost(self, endpoint: str) -> None:
        with self.lock:
            lost = [p for p in self.pending.values() if p.prefill_rpc == endpoint and _waiting_on_prefill(p)]
            for p in [*lost, *self.quarantine.values()]:
                if p.prefill_rpc == endpoint:
                    p.writer_lost = True
        for pending in lost:
            self._fail(
                pending, 503, f"lost the connection to the prefill node {endpoint}", True, "prefill_lost"
            )


def _waiting_on_prefill(pending: Pending) -> bool:
    """Still needs something from the prefill node: its KV, or (KV landed) its first token."""
    return not pending.admitted and (not pending.landed or pending.first_token is None)
