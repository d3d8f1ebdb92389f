"""The prefill node's work for decode nodes: `prefill` in, KV pushed layer by layer, `first_token` out at
once.

One request, in order:
  1. `prefill` {prompt, params, the decode node's KV endpoint and reserved blocks} arrives on our ROUTER from
     the decode node's DEALER. Checked (params, vocabulary, queue depth); a refusal is an `error` back to it.
  2. On a worker thread: the connector's handshake with that decode node (once per node, the only round trip
     on the KV link), then `bind`: our writes go into the blocks `prefill` named. No second reservation
     exchange.
  3. The prompt enters the engine (chunked prefill over our prefix cache) with max_tokens 1: the transfer
     hooks (step_hooks.py) write each layer's final blocks into the decode node's cache while later layers
     compute.
  4. The sampled first token goes to the decode node at once as `first_token`, with prefill_queue / prefill
     timings: TTFT is the prefill's time, not the transfer's. Prompt logprobs, when asked, go just before it
     (`prompt_logprobs` pieces: the prompt was computed here, the decode node relays them to the proxy). The
     engine request has finished then and its blocks go to our prefix cache; the data plane keeps the next
     step from overwriting them before they are copied.
  5. The connector's completion (the fence after the last write, or a failure once nothing more can be
     written) sends `prefill_done` with the transfer timings. Every `prefill` gets exactly one `prefill_done`,
     always last: the decode node frees a released request's blocks on it. A failure before the first token
     also aborts the engine request.
An `abort` from the decode node (or its DEALER going away) stops the prefill and the transfer at any point.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from pdserve.engine.engine_loop import Sink
from pdserve.wire.errors import PromptTooLongError
from pdserve.wire.node_messages import FirstToken, Prefill, PrefillDone, plain, prompt_logprob_pieces
from pdserve.wire.sampling_params import SamplingParams

log = logging.getLogger(__name__)

ENGINE_ID_SUFFIX = "#prefill"


@dataclass(eq=False)
class PrefillJob:
    request_id: str
    identity: bytes  # the decode node's DEALER
    msg: Prefill
    params: SamplingParams  # the engine's copy: max_tokens 1
    arrival: float = field(default_factory=time.monotonic)
    scheduled_at: float = 0.0
    in_engine: bool = False

    @property
    def engine_id(self) -> str:
        return self.request_id + ENGINE_ID_SUFFIX

    @property
    def kv_id(self) -> str:
        """The connector's id for it: the one the decode node chose for its KV frames."""
        return self.msg.kv_request_id

    first_token_sent: bool = False
    ended: bool = (
        False  # aborted or failed (a finished transfer is not an end: the first token may still come)
    )
    done_sent: bool = False  # prefill_done went out: the decode node may free the blocks


class PrefillService:
    def __init__(self, node):
        from pdserve.kvconnector.producer import KVProducer
        from pdserve.node_runtime.connector import connector_config, kv_layout
        from pdserve.prefill_node.step_hooks import TransferStepHooks

        self.node = node
        self.core, self.loop, self.rpc = node.core, node.loop, node.rpc
        self.lock = threading.Lock()
        self.jobs: dict[str, PrefillJob] = {}
        self.bound: dict[str, PrefillJob] = {}  # by kv_id: those the connector may write for (from bind on)
        self.producer = KVProducer(connector_config(node), kv_layout(node), on_complete=self._on_complete)
        node.metrics.extra_registries.append(self.producer.metrics.registry)
        self.hooks = TransferStepHooks(self.core, self.producer, self.transfer_id)
        self.executor = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="prefill-reserve")

    def transfer_id(self, engine_request_id: str) -> Optional[str]:
        """Engine request ids carry a suffix, so a kv_both node can prefill for itself without a clash."""
        if not engine_request_id.endswith(ENGINE_ID_SUFFIX):
            return None
        job = self.jobs.get(engine_request_id[: -len(ENGINE_ID_SUFFIX)])
        return job.kv_id if job is not None and self.producer.scheduler.is_active(job.kv_id) else None

    @property
    def num_active(self) -> int:
        return len(self.jobs)

    def handles(self, msg) -> bool:
        return isinstance(msg, Prefill)

    def preconnect(self, endpoints: list[str]) -> None:
        """RPC thread: open KV links to these decode nodes on a worker, before a request needs one (the signed
        handshake and, on cuda_ipc, mapping the peer's cache cost the first request tens of ms otherwise).
        A failure only logs: the first request connects again, and fails there if it still cannot."""
        for endpoint in endpoints:
            self.executor.submit(self._preconnect, endpoint)

    def _preconnect(self, endpoint: str) -> None:
        try:
            self.producer.connect(parse_endpoint(endpoint))
            log.info("KV link to %s open ahead of its first request", endpoint)
        except Exception as exc:  # noqa: BLE001 - any failure here is retried by the first real bind
            log.info("KV link to %s not opened ahead (%s); the first request will try", endpoint, exc)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.producer.close()

    # ---- 1: a decode node asks -----------------------------------------------------------------------------
    def on_message(self, identity: bytes, msg: Prefill) -> None:
        rid, node = msg.request_id, self.node
        params = node.admit_or_reject(identity, rid, msg.params, msg.prompt_token_ids)
        if params is None:  # refused at the door: nothing will be written, the decode node may free at once
            return self.rpc.send(identity, PrefillDone(request_id=rid, ok=False, cause="rejected"))
        # This node samples only the first token; the decode node continues.
        engine_params = params.clone(max_tokens=1, min_tokens=min(params.min_tokens, 1))
        job = PrefillJob(rid, identity, msg, engine_params)
        with self.lock:
            if rid in self.jobs:
                return node.reject(identity, rid, 400, f"request id {rid!r} is already prefilling here")
            self.jobs[rid] = job
        self.executor.submit(self._reserve_and_run, job)

    # ---- 2-3: bind the decode node's reservation, then prefill ---------------------------------------------
    def _reserve_and_run(self, job: PrefillJob) -> None:
        msg = job.msg
        with self.lock:  # before bind: an abort racing the bind then finds it and aborts in the connector
            self.bound[job.kv_id] = job
        try:
            self.producer.bind(
                job.kv_id,
                parse_endpoint(msg.kv_endpoint),
                len(msg.prompt_token_ids),
                msg.block_ids,
                msg.num_cached_blocks,
            )
        except Exception as exc:  # unreachable decode node, layout refused, a reservation that does not fit
            with self.lock:
                self.bound.pop(job.kv_id, None)
            return self._fail(job, 503, f"KV link to the decode node failed: {exc}", retryable=True)
        with self.lock:  # abort() reads in_engine under the same lock: one of the two sees the other
            if not job.ended:
                job.in_engine = True
        if not job.in_engine:
            self.producer.abort(job.kv_id, "aborted")
            return
        sink = Sink(
            on_output=lambda out: self._on_output(job, out),
            on_fail=lambda why: self._fail(job, 503, why, retryable=True),
            on_scheduled=lambda t: setattr(job, "scheduled_at", t),
        )
        future = self.loop.add_request(job.engine_id, msg.prompt_token_ids, job.params, sink)
        future.add_done_callback(lambda f: self._added(job, f))

    def _added(self, job: PrefillJob, future) -> None:
        exc = future.exception()
        if exc is not None:
            status = 400 if isinstance(exc, (PromptTooLongError, ValueError)) else 503
            self._fail(job, status, str(exc), retryable=status == 503)

    # ---- 4: the first token --------------------------------------------------------------------------------
    def _on_output(self, job: PrefillJob, out) -> None:
        if job.ended or job.first_token_sent or not out.new_token_ids:
            return
        job.first_token_sent = True
        now = time.monotonic()
        scheduled = job.scheduled_at or job.arrival
        if out.prompt_logprobs:  # computed here, during the prefill; the decode node relays them to the proxy
            for piece in prompt_logprob_pieces(job.request_id, out.prompt_logprobs):
                self.rpc.send(job.identity, piece)
        self.rpc.send(
            job.identity,
            FirstToken(
                request_id=job.request_id,
                token=out.new_token_ids[0],
                logprobs=plain(out.new_logprobs[0]) if out.new_logprobs else None,
                num_cached_tokens=max(out.num_cached_tokens, 0),
                timings={
                    "prefill_queue": max(scheduled - job.arrival, 0.0),
                    "prefill": max(now - scheduled, 0.0),
                },
            ),
        )

    # ---- 5: the transfer's end -----------------------------------------------------------------------------
    def _on_complete(self, kv_id: str, ok: bool, timings: dict) -> None:
        """The connector is done with kv_id: nothing more will be written for its request."""
        with self.lock:
            job = self.bound.pop(kv_id, None)
            if job is not None and self.jobs.get(job.request_id) is job:
                del self.jobs[job.request_id]
        if job is None:
            return
        if not ok and not job.ended:
            job.ended = True  # no first token after a failed transfer: the decode node cannot use it
            if not job.first_token_sent:
                self.loop.abort(job.engine_id)
        exposed = timings.get("exposed_gpu_s", timings.get("exposed_s", 0.0))
        self._prefill_done(
            job,
            ok,
            str(timings.get("cause", "")),
            {"transfer": float(timings.get("transfer_s", 0.0)), "exposed_transfer": float(exposed)},
        )

    def _prefill_done(self, job: PrefillJob, ok: bool, cause: str, timings: dict) -> None:
        """Exactly once per job, and only once nothing more will be written for it."""
        with self.lock:
            if job.done_sent:
                return
            job.done_sent = True
        self.rpc.send(
            job.identity, PrefillDone(request_id=job.request_id, ok=ok, cause=cause, timings=timings)
        )

    # ---- ends from outside ---------------------------------------------------------------------------------
    def abort(self, request_id: str, reason: str) -> None:
        with self.lock:
            job = self.jobs.pop(request_id, None)
            if job is None:
                return
            job.ended = True
        self.producer.abort(job.kv_id, reason)
        if job.in_engine:
            self.loop.abort(job.engine_id)
        self.node.metrics.aborted.labels("decode_node").inc()

    def on_unroutable(self, identity: bytes) -> None:
        with self.lock:
            gone = [j.request_id for j in self.jobs.values() if j.identity == identity]
        for rid in gone:
            self.abort(rid, "the decode node went away")

    def _fail(self, job: PrefillJob, status: int, message: str, retryable: bool) -> None:
        with self.lock:
            if self.jobs.get(job.request_id) is job:
                del self.jobs[job.request_id]
            bound = self.bound.get(job.kv_id) is job
            first_end, job.ended = not job.ended, True
        if first_end:
            if job.in_engine:
                self.loop.abort(job.engine_id)
            self.node.reject(job.identity, job.request_id, status, message, retryable)
        if bound:  # the connector's completion sends prefill_done once its writes are fenced
            self.producer.abort(job.kv_id, message)
        else:
            self._prefill_done(job, False, "error", {})


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or 'tcp://host:port' -> (host, port)."""
    text = endpoint.split("://", 1)[-1]
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad KV endpoint {endpoint!r}")
    return host.strip("[]"), int(port)
