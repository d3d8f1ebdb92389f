"""Runs an EngineCore on one thread and routes each step's outputs to per-request sinks (both node roles use
it).

The EngineCore is not thread-safe, so exactly one thread (the loop) ever touches it. Other threads (the node's
RPC thread, the KV connector's callbacks, timers) hand it work with `call(fn)`, which runs `fn(core)` on the
loop thread between two steps and returns a Future. The loop, each turn:
  1. runs every queued command (blocking on the queue while there is nothing to step);
  2. runs the `before_step` hooks (the decode node admits requests whose KV has landed);
  3. steps the core once and hands each StepOutput to its request's sink (a finished one drops its sink);
  4. runs the `after_step` hooks (KV events, timings) and publishes a `LoopSnapshot` for /metrics and
     heartbeats.

Sinks run on the loop thread: they must only queue work for another thread (the node puts a wire message on
its outbox), never block. A request whose own work fails inside a step (engine/step_isolation.py) gets its
sink's `on_fail` alone. A step-wide failure is a bug: it is logged with the requests in the step and retried
once when nothing moved yet; if it fails again every in-flight request is aborted (its sink's `on_fail` is
called, its blocks freed), the error is counted, and the loop keeps serving new requests. A failure whose
cause is marked `fatal` (a tensor-parallel rank died) is not retried: the loop aborts everything and sets
`broken` to the reason, and its node stops taking requests.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pdserve.engine.request import RequestStatus
from pdserve.engine.step_isolation import StepFailed

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long an idle loop blocks on its command queue before running its hooks again
STALLED_WAIT_S = 0.002  # unfinished requests but nothing schedulable (blocks held elsewhere): poll gently


@dataclass(slots=True)
class Sink:
    """Where one request's outputs go. on_output(StepOutput) per step; on_fail(message) if the engine failed
    it."""

    on_output: Callable[[Any], None]
    on_fail: Callable[[str], None] = lambda message: None
    on_scheduled: Optional[Callable[[float], None]] = None  # first time a step computes any of its tokens


@dataclass(slots=True, frozen=True)
class LoopSnapshot:
    """One consistent view of the engine, taken on the loop thread after each turn (read from any thread)."""

    num_waiting: int = 0
    num_waiting_remote: int = (
        0  # decode: blocks reserved, KV arriving from a prefill node (not in num_waiting)
    )
    num_running: int = 0
    num_free_blocks: int = 0
    num_used_blocks: int = 0
    num_cached_blocks: int = 0
    num_total_blocks: int = 0
    block_size: int = 0
    num_preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    steps: int = 0
    ts: float = 0.0


class EngineLoop:
    def __init__(self, core, name: str = "engine-loop"):
        self.core = core
        self.name = name
        self.snapshot = LoopSnapshot()
        self.before_step: list[Callable[[], None]] = []
        self.after_step: list[Callable[[list], None]] = []
        self.step_failures = 0
        self.broken: Optional[str] = None  # why no step can run any more (a fatal step failure)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._unscheduled: set[str] = set()  # requests with a sink that wants on_scheduled, not scheduled yet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.alive = False

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        self.alive = True
        self._take_snapshot()
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(None)  # wake it
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # ---- work from other threads ---------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args, **kwargs) -> concurrent.futures.Future:
        """Run fn(*args, **kwargs) on the loop thread between steps; the Future holds its result or
        exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError("the engine loop is stopped"))
            return future
        self._commands.put((fn, args, kwargs, future))
        return future

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params, sink: Sink
    ) -> concurrent.futures.Future:
        """Queue a request in the core (on the loop thread); the Future raises what add_request raised."""
        return self.call(self._add, request_id, prompt_token_ids, params, sink)

    def abort(self, request_id: str) -> concurrent.futures.Future:
        """Abort in the core and drop the sink (no further outputs). Result: whether the core knew the
        request."""
        return self.call(self._abort, request_id)

    # ---- loop-thread API (call only from the loop thread: commands, hooks, sinks) --------------------------
    def attach(self, request_id: str, sink: Sink) -> None:
        """Route request_id's outputs to sink (for requests put into the core by an adapter, not
        add_request)."""
        self._sinks[request_id] = sink
        if sink.on_scheduled is not None:
            self._unscheduled.add(request_id)

    def detach(self, request_id: str) -> Optional[Sink]:
        self._unscheduled.discard(request_id)
        return self._sinks.pop(request_id, None)

    def _add(self, request_id: str, prompt_token_ids, params, sink: Sink):
        request = self.core.add_request(request_id, prompt_token_ids, params)
        self.attach(request_id, sink)
        return request

    def _abort(self, request_id: str) -> bool:
        self.detach(request_id)
        known = self.core.scheduler.get_request(request_id) is not None
        self.core.abort_request(request_id)
        return known

    # ---- the loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        stalled = False
        try:
            while not self._stop.is_set():
                # 1. commands; block only when there is nothing to step
                busy = self.core.has_unfinished()
                self._drain(wait=None if busy and not stalled else (STALLED_WAIT_S if busy else IDLE_WAIT_S))
                if self._stop.is_set():
                    break
                # 2. admissions from elsewhere
                for hook in self.before_step:
                    self._guard(hook)
                # 3. one step
                outputs: list = []
                stalled = False
                if self.core.has_unfinished():
                    steps = self.core.stats.steps
                    outputs = self._step()
                    stalled = self.core.stats.steps == steps and not outputs
                # 4. after-step hooks and the snapshot
                for hook in self.after_step:
                    self._guard(hook, outputs)
                self._take_snapshot()
        finally:
            self.alive = False
            self._fail_pending_commands()

    def _drain(self, wait: Optional[float]) -> None:
        try:
            item = self._commands.get(timeout=wait) if wait else self._commands.get_nowait()
        except queue.Empty:
            return
        while item is not None or not self._commands.empty():
            if item is not None:
                fn, args, kwargs, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller through the Future
                        future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> list:
        started = time.monotonic()
        outputs = self._step_with_retry()
        if outputs is None:
            return []
        if self._unscheduled:
            self._mark_scheduled(started)
        # before any sink sends a token: a client that saw its last token then reads /health sees its blocks
        # freed
        self._take_snapshot()
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if out.finished:
                self.detach(out.request_id)
            if sink is None:
                continue
            if getattr(out, "error", None):
                self._guard(sink.on_fail, out.error)
            else:
                self._guard(sink.on_output, out)
        return outputs

    def _step_with_retry(self) -> Optional[list]:
        """The step's outputs; None after a step-wide failure that a retry did not cure (everything
        aborted)."""
        for attempt in (1, 2):
            try:
                return self.core.step()
            except StepFailed as exc:
                self.step_failures += 1
                log.error(
                    "engine step failed (attempt %d) with requests %s in the batch: %s",
                    attempt,
                    ", ".join(exc.request_ids) or "-",
                    exc,
                    exc_info=exc.cause,
                )
                if getattr(exc.cause, "fatal", False):
                    self.broken = str(exc.cause)
                    break
                if not exc.retryable:
                    break
            except Exception:
                self.step_failures += 1
                log.exception("engine step failed (attempt %d) outside the batch's work", attempt)
                break
        log.error("aborting every in-flight request after the failed step")
        self._fail_all(self.broken or "internal error in the engine step")
        return None

    def _mark_scheduled(self, step_started: float) -> None:
        scheduler = self.core.scheduler
        for request_id in list(self._unscheduled):
            request = scheduler.get_request(request_id)
            waiting_remote = request is not None and request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
            if (
                request is None
                or not waiting_remote
                and (request.num_computed_tokens > 0 or request.num_output_tokens > 0)
            ):
                self._unscheduled.discard(request_id)
                sink = self._sinks.get(request_id)
                if sink is not None and sink.on_scheduled is not None:
                    self._guard(sink.on_scheduled, step_started)

    def _fail_all(self, message: str) -> None:
        for request_id in list(self._sinks):
            sink = self.detach(request_id)
            try:
                self.core.abort_request(request_id)
            except Exception:
                log.exception("abort of %s after a failed step also failed", request_id)
            if sink is not None:
                self._guard(sink.on_fail, message)

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[3].set_running_or_notify_cancel():
                item[3].set_exception(RuntimeError("the engine loop stopped"))

    @staticmethod
    def _guard(fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("engine loop callback %s failed", getattr(fn, "__qualname__", fn))

    def _take_snapshot(self) -> None:
        core = self.core
        pool, scheduler = core.block_pool, core.scheduler
        free, cached = pool.num_free, pool.num_cached
        stats = pool.stats
        self.snapshot = LoopSnapshot(
            num_waiting=len(scheduler.waiting),
            num_waiting_remote=len(scheduler.remote),
            num_running=len(scheduler.running),
            num_free_blocks=free,
            num_used_blocks=pool.num_blocks - free - cached,
            num_cached_blocks=cached,
            num_total_blocks=pool.num_blocks,
            block_size=pool.block_size,
            num_preemptions=scheduler.num_preemptions,
            prefix_queried_tokens=stats.queried_tokens,
            prefix_hit_tokens=stats.hit_tokens,
            steps=core.stats.steps,
            ts=time.time(),
        )
