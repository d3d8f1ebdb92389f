"""The connector's scheduler side: which blocks of which request go where, and each request's state
(torch-free).

Producer (prefill node), per request:
    bind() --> TRANSFERRING --the fence after its last blocks' last layer completed--> DONE
Consumer (decode node), per request:
    reserve() --> WAITING --(tcp: first chunk) RECEIVING--> the producer's Done --> DONE
There is one reservation round trip, and it is the decode node's: its message asking for the prefill carries
the reserved block ids, and the prefill node binds them (`bind`) without asking the consumer again.
Any state --abort() / timeout / peer lost--> ABORTED. A terminal transition removes the request from the table
under the lock, so exactly one caller gets its `Finished` record and the completion is notified exactly once.

Which blocks move: prompt block i (tokens [i*bs, (i+1)*bs)) goes to the consumer's block `remote[i -
num_cached]` for i >= num_cached (the consumer already holds the first num_cached as prefix hits). A block is
sent once, when it is final: full after this step, or the prompt's last (partial) block when the prompt
finishes. Blocks the producer had cached are final from the first step, so they go with the first step's
layers. A sliding-window layer gets only the blocks its window will read on the decode node (prompt blocks
from `wire.sliding_window.first_window_block` on): both sides derive the same cut from the prompt's length,
so the consumer expects exactly the (layer, block) pieces the producer sends.

The producer's timeouts are inactivity timeouts (`--kv-timeout`): every sign of progress pushes the deadline
out, so a long prefill is not cut off while its layers go out, but a stuck one is. The consumer keeps no
deadline of its own: its node decides when to give up, and frees the blocks only once the producer can no
longer write them.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence

from pdserve.wire.sliding_window import first_window_block

DEFAULT_KV_TIMEOUT = 10.0  # --kv-timeout: the one default; ConnectorConfig, NodeOptions and the flag read it


class State(enum.Enum):
    TRANSFERRING = "transferring"
    WAITING = "waiting"
    RECEIVING = "receiving"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(slots=True)
class Finished:
    """A request's one terminal record: ok, or why not (cause is the metrics label)."""

    request_id: str
    ok: bool
    cause: str = ""  # "", abort, timeout, peer_lost, remote_abort, error
    detail: str = ""
    timings: dict = field(default_factory=dict)
    peer: Hashable = None


@dataclass(slots=True)
class SendPlan:
    """One step's blocks of one request: local block ids -> the consumer's block ids. Shapes: both [n]."""

    request_id: str
    peer: Hashable
    local_block_ids: list[int]
    remote_block_ids: list[int]
    last: bool  # the request's final plan: after it, Done
    window_skips: dict = field(default_factory=dict)  # sliding window -> leading blocks of this plan not sent


@dataclass(slots=True)
class _ProducerRequest:
    request_id: str
    peer: Hashable
    num_tokens: int
    deadline: float
    state: State = State.TRANSFERRING
    remote_block_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    planned_upto: int = 0  # prompt blocks [0, planned_upto) are planned
    final_planned: bool = False
    timings: dict = field(default_factory=dict)


class _RequestTable:
    """What both sides' tables share: a lock, per-request deadlines, and ending a request exactly once."""

    timeout: float
    clock: Callable[[], float]
    lock: threading.RLock
    _reqs: dict
    _timeout_detail = "no progress for {timeout:.1f}s in {state}"

    def abort(self, request_id: str, cause: str = "abort", detail: str = "") -> Optional[Finished]:
        with self.lock:
            req = self._reqs.get(request_id)
            return None if req is None else self._finish(req, False, cause, detail)

    def expire(self) -> list[Finished]:
        with self.lock:
            now = self.clock()
            late = [r for r in self._reqs.values() if r.deadline <= now]
            return [
                self._finish(
                    r,
                    False,
                    "timeout",
                    self._timeout_detail.format(timeout=self.timeout, state=r.state.value),
                )
                for r in late
            ]

    def peer_lost(self, peer: Hashable, detail: str = "") -> list[Finished]:
        with self.lock:
            gone = [r for r in self._reqs.values() if r.peer == peer]
            return [self._finish(r, False, "peer_lost", detail) for r in gone]

    def active(self) -> list[str]:
        with self.lock:
            return list(self._reqs)

    def _finish(self, req, ok: bool, cause: str = "", detail: str = "") -> Finished:
        """Remove the request; the caller reports the Finished once (completion is notified exactly once)."""
        del self._reqs[req.request_id]
        req.state = State.DONE if ok else State.ABORTED
        req.timings["end"] = time.time()
        return Finished(req.request_id, ok, cause, detail, req.timings, req.peer)


class ProducerScheduler(_RequestTable):
    def __init__(
        self,
        block_size: int,
        timeout: float = DEFAULT_KV_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        layer_windows: Sequence[int] = (),
    ):
        self.block_size, self.timeout, self.clock = block_size, timeout, clock
        # layers per distinct window (0: full attention): a plan is cut and counted per window, not per layer
        self._layers_per_window = Counter(layer_windows)
        self.lock = threading.RLock()
        self._reqs: dict[str, _ProducerRequest] = {}

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def bind(
        self, request_id: str, peer: Hashable, num_tokens: int, remote_block_ids: list[int], num_cached: int
    ) -> None:
        """The consumer's blocks for prompt blocks num_cached.. (it holds the first num_cached). Raises
        ValueError when they do not cover the prompt or the request is already transferring."""
        need = self.num_blocks(num_tokens) - num_cached
        if num_tokens < 1 or num_cached < 0 or len(remote_block_ids) != need:
            raise ValueError(
                f"the consumer reserved {len(remote_block_ids)} blocks + {num_cached} cached, the "
                f"prompt of {num_tokens} tokens needs {self.num_blocks(num_tokens)}"
            )
        with self.lock:
            if request_id in self._reqs:
                raise ValueError(f"request {request_id!r} is already transferring")
            self._reqs[request_id] = _ProducerRequest(
                request_id,
                peer,
                num_tokens,
                self.clock() + self.timeout,
                remote_block_ids=list(remote_block_ids),
                num_cached=num_cached,
                planned_upto=num_cached,
                timings={"bound": time.time(), "blocks": len(remote_block_ids)},
            )

    def plan(
        self, request_id: str, num_computed_tokens: int, block_ids: list[int], prompt_done: bool
    ) -> Optional[SendPlan]:
        """After a step's schedule: the blocks that become final in it (None when none, or not transferring).

        block_ids is the request's local block table (at least the blocks computed so far)."""
        with self.lock:
            req = self._reqs.get(request_id)
            if req is None or req.state is not State.TRANSFERRING or req.final_planned:
                return None
            total = self.num_blocks(req.num_tokens)
            prompt_done = prompt_done or num_computed_tokens >= req.num_tokens
            upto = total if prompt_done else min(num_computed_tokens // self.block_size, total)
            if len(block_ids) < upto:
                raise ValueError(
                    f"request {request_id!r}: block table has {len(block_ids)} blocks, need {upto}"
                )
            first = req.planned_upto
            if upto <= first and not prompt_done:
                return None
            req.planned_upto = max(upto, first)
            req.final_planned = prompt_done
            local = list(block_ids[first:upto])
            remote = req.remote_block_ids[first - req.num_cached : upto - req.num_cached]
            skips = self._window_skips(req.num_tokens, first, len(local))
            if self._layers_per_window:  # (layer, block) pieces sent, for the byte count
                per_window = self._layers_per_window.items()
                pieces = sum(n * (len(local) - skips.get(w, 0)) for w, n in per_window)
                req.timings["pieces"] = req.timings.get("pieces", 0) + pieces
            return SendPlan(request_id, req.peer, local, remote, prompt_done, skips)

    def _window_skips(self, num_tokens: int, first: int, count: int) -> dict:
        """Per sliding window: how many of the plan's blocks (prompt blocks first..first+count) its layers
        skip."""
        return {
            w: min(max(first_window_block(num_tokens, w, self.block_size) - first, 0), count)
            for w in self._layers_per_window
            if w
        }

    def is_active(self, request_id: str) -> bool:
        with self.lock:
            req = self._reqs.get(request_id)
            return req is not None

    def progress(self, request_id: str, mark: Optional[str] = None) -> None:
        with self.lock:
            req = self._reqs.get(request_id)
            if req is not None:
                req.deadline = self.clock() + self.timeout
                if mark and mark not in req.timings:
                    req.timings[mark] = time.time()

    def done(self, request_id: str) -> Optional[Finished]:
        """Every layer of every block landed in the consumer's cache (the fence after the last write
        completed)."""
        with self.lock:
            req = self._reqs.get(request_id)
            if req is None or not req.final_planned:
                return None
            req.timings["done"] = time.time()
            return self._finish(req, True)


@dataclass(slots=True)
class _ConsumerRequest:
    request_id: str
    peer: Hashable
    block_index: dict[int, int]  # consumer block id -> column
    landed: list[int]  # per layer a bit mask over the columns: bit c set once (layer, block c) landed
    remaining: int
    deadline: float
    state: State = State.WAITING
    timings: dict = field(default_factory=dict)


class ConsumerScheduler(_RequestTable):
    _timeout_detail = "no KV for {timeout:.1f}s in {state}"

    def __init__(
        self,
        num_layers: int,
        timeout: float = DEFAULT_KV_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.num_layers, self.timeout, self.clock = num_layers, timeout, clock
        self.lock = threading.RLock()
        self._reqs: dict[str, _ConsumerRequest] = {}

    def reserve(self, request_id: str, block_ids: list[int], layer_skips: Sequence[int] = ()) -> None:
        """Blocks the node allocated for this request (excluding its prefix hits); the producer learns them
        from the node's prefill request, not from us. No deadline: the node gives up, not the table.
        layer_skips: per layer, the leading reserved blocks a sliding-window layer will not get."""
        with self.lock:
            if request_id in self._reqs:
                raise ValueError(f"request {request_id!r} already has a reservation")
            n = len(block_ids)
            if len(set(block_ids)) != n:
                raise ValueError(f"request {request_id!r}: duplicate block ids in the reservation")
            req = _ConsumerRequest(
                request_id,
                None,
                {b: i for i, b in enumerate(block_ids)},
                [0] * self.num_layers,
                self.num_layers * n - sum(min(skip, n) for skip in layer_skips),
                float("inf"),
                timings={"reserved": time.time()},
            )
            self._reqs[request_id] = req

    def check_chunk(self, request_id: str, first_layer: int, num_layers: int, block_ids: list[int]) -> str:
        """'' when the chunk may be scattered, else why not (unknown request, foreign blocks, bad layers)."""
        with self.lock:
            req = self._reqs.get(request_id)
            if req is None:
                return "unknown or finished request"
            if first_layer + num_layers > self.num_layers:
                return f"layers {first_layer}+{num_layers} beyond {self.num_layers}"
            if any(b not in req.block_index for b in block_ids):
                return "blocks outside the reservation"
            return ""

    def landed(self, request_id: str, first_layer: int, num_layers: int, block_ids: list[int]) -> None:
        """A tcp chunk was written into the cache: count it (the producer's Done completes the request)."""
        with self.lock:
            req = self._reqs.get(request_id)
            if req is None:
                return
            # O(blocks + layers) per chunk, not O(blocks x layers): a chunk of 24 layers x 512 blocks landing
            # at the end of a transfer must not cost milliseconds of Python before the request completes.
            mask = 0
            for b in block_ids:
                mask |= 1 << req.block_index[b]
            for layer in range(first_layer, first_layer + num_layers):
                new = mask & ~req.landed[layer]
                if new:
                    req.landed[layer] |= new
                    req.remaining -= new.bit_count()
            req.state = State.RECEIVING
            req.timings.setdefault("first_chunk", time.time())

    def done(self, request_id: str, counted: bool) -> Optional[Finished]:
        """The producer's Done: every write landed. counted: the plane's bytes passed through us (tcp), so
        every (layer, block) must have been seen; a one-sided plane's writes are the producer's word alone."""
        with self.lock:
            req = self._reqs.get(request_id)
            if req is None:
                return None
            if counted and req.remaining:
                return self._finish(
                    req, False, "error", f"Done with {req.remaining} (layer, block) pieces missing"
                )
            req.timings["landed"] = time.time()
            return self._finish(req, True)
