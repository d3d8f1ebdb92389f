"""The connector's worker side: turns each step's send plans into one-sided writes, and fences into
completions.

Producer, on the forward thread (inside the engine step):
    start_step(plans)   group the step's plans by peer (one `PeerWrites` each) and stage their block ids; a
                        sliding-window model gets a second, shorter set for its sliding layers (the blocks
                        their window reads on the decode node)
    save_layer(l)       after layer l wrote its KV: one `write_layer` per peer (cuda_ipc: an event record and
                        one kernel launch; no locks, no thread hand-offs, no host syncs, no Python per block);
                        after the last layer, for each request whose last blocks went out in this step, a
                        fence on its peer's plane, handed to the completion thread
    end_step(ok)        the step is over (a failed forward fenced nobody: its requests are aborted by the
                        caller)
`after_writes(rid, fn)` (any thread) runs fn once nothing more can be written for rid: after the step in
progress if it writes rid, then after a fence. An aborted request's blocks on the consumer are freed only
then.

Consumer: `write(header, tensor)` copies a tcp chunk [1, 2, n, *block] into its reserved blocks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from functools import partial
from typing import Callable, Optional, Sequence

import torch

from pdserve.kvconnector.head_layout import HeadLayout
from pdserve.kvconnector.scheduler_side import SendPlan
from pdserve.kvconnector.transport import DataPlane, Fence, PeerWrites
from pdserve.wire.frames import KVChunk

log = logging.getLogger(__name__)

# (request_id, exposed seconds where the plane measured it, time.time() when the last layer was computed)
OnLanded = Callable[[str, Optional[float], float], None]
OnFailed = Callable[[str], None]  # (request_id): a write before its fence did not land


class CompletionThread:
    """Waits on fences in order (each wait sleeps, GIL released) and runs their callbacks: the one thread a
    request's completion passes through before its `Done` goes out."""

    def __init__(self, name: str = "kv-completion"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def after(self, fence: Fence, fn: Callable[[Fence], None]) -> None:
        self._q.put((fence, fn))

    def close(self) -> None:
        self._q.put(None)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fence, fn = item
            try:
                fence.wait()
            except Exception:  # a failed device or write: the callback still ends the request, as failed
                log.exception("waiting on a KV fence failed")
                fence.failed = True
            try:
                fn(fence)
            except Exception:
                log.exception("KV completion callback failed")


class ProducerWorker:
    def __init__(
        self,
        plane: DataPlane,
        on_landed: OnLanded,
        on_first_write: Callable[[str], None],
        on_failed: Optional[OnFailed] = None,
        layer_windows: Sequence[int] = (),
    ):
        self.plane = plane
        self.num_layers = len(plane.caches)
        self.layer_windows = tuple(layer_windows) or (0,) * self.num_layers
        self.on_landed, self.on_first_write = on_landed, on_first_write
        self.on_failed = on_failed or (lambda rid: None)
        self.completions = CompletionThread()
        self._writes: dict[int, list[PeerWrites]] = {}  # window (0: full attention) -> the step's writes
        self.step_plans: list[SendPlan] = []
        self.last_plans: list[SendPlan] = []  # this step's plans that finish their request
        self._step_rids: frozenset = frozenset()
        self._deferred: list[tuple[str, object, Callable[[Fence], None]]] = []
        self._lock = threading.Lock()  # taken twice a step (never per layer), against after_writes

    # ----------------------------------------------------------------------------------------------- per step

    def begin_planning(self, request_ids) -> None:
        """Before the step's plans are made: an abort of any of these from now on waits for the step's end (an
        abort that came earlier has already taken the request out of the plan)."""
        with self._lock:
            self._step_rids = frozenset(request_ids)

    def start_step(self, plans: Sequence[SendPlan]) -> None:
        self._writes = {window: _by_peer(plans, window) for window in set(self.layer_windows)}
        for writes in self._writes.values():
            for w in writes:
                self.plane.stage(w)
        for plan in plans:
            if plan.local_block_ids:
                self.on_first_write(plan.request_id)
        self.step_plans = list(plans)
        self.last_plans = [p for p in plans if p.last]

    def save_layer(self, layer: int) -> None:
        for w in self._writes[self.layer_windows[layer]]:
            self.plane.write_layer(w, layer)
        if layer == self.num_layers - 1 and self.last_plans:
            # Fence right behind the last copies (the host may reach end_step late), and note when the last
            # layer was computed here, not in end_step: on a fast plane the fence may complete first.
            computed = time.time()
            for plan in self.last_plans:
                landed = partial(self._landed, plan.request_id, computed)
                self.completions.after(self.plane.fence(plan.peer), landed)
            self.last_plans = []

    def _landed(self, request_id: str, last_layer: float, fence: Fence) -> None:
        if fence.failed:
            self.on_failed(request_id)
        else:
            self.on_landed(request_id, fence.exposed_s(), last_layer)

    def end_step(self, ok: bool = True) -> None:
        """ok False: the forward failed part way; no request of the step is complete (the caller aborts
        them)."""
        self.plane.end_step()
        with self._lock:
            self._step_rids, deferred, self._deferred = frozenset(), self._deferred, []
        for _, peer, fn in deferred:
            self.completions.after(self.plane.fence(peer), fn)
        self._writes, self.step_plans, self.last_plans = {}, [], []

    # ------------------------------------------------------------------------------------------------ ends

    def after_writes(self, request_id: str, peer, fn: Callable[[Fence], None]) -> None:
        """Run fn once every write for request_id has landed or can no longer start (any thread)."""
        with self._lock:
            if request_id in self._step_rids:
                self._deferred.append((request_id, peer, fn))
                return
        self.completions.after(self.plane.fence(peer), fn)

    def close(self) -> None:
        self.completions.close()


def _by_peer(plans: Sequence[SendPlan], window: int) -> list[PeerWrites]:
    """The plans' blocks grouped by peer, without the leading blocks a layer of `window` does not read."""
    by_peer: dict[int, PeerWrites] = {}
    for plan in plans:
        skip = plan.window_skips.get(window, 0) if window else 0
        if len(plan.local_block_ids) <= skip:
            continue
        w = by_peer.get(id(plan.peer))
        if w is None:
            w = by_peer[id(plan.peer)] = PeerWrites(plan.peer, [], [], [])
        w.request_ids.append(plan.request_id)
        w.src.append(plan.local_block_ids[skip:])
        w.dst.append(plan.remote_block_ids[skip:])
    return list(by_peer.values())


class ConsumerWorker:
    """Writes tcp chunks into the reserved blocks (the only data plane whose bytes reach the consumer's
    host); a chunk holds every KV head, written into each tensor-parallel rank's share of them."""

    def __init__(self, layout: HeadLayout):
        self.layout = layout
        self.caches = layout.layers

    def check(self, header: KVChunk, tensor: torch.Tensor) -> str:
        c = self.caches[0]
        heads = self.layout.num_kv_heads
        want = (header.num_layers, c.shape[0], len(header.block_ids), c.shape[2], heads, c.shape[4])
        if tuple(tensor.shape) != want or tensor.dtype != c.dtype:
            return f"chunk {tuple(tensor.shape)} {tensor.dtype}, cache wants {want} {c.dtype}"
        if header.first_layer + header.num_layers > len(self.caches):
            return "layers beyond the cache"
        return ""

    def write(self, header: KVChunk, tensor: torch.Tensor) -> None:
        """[k, 2, n, *block] into blocks header.block_ids of layers first_layer..first_layer+k."""
        cache = self.caches[0]
        ids = torch.tensor(header.block_ids, dtype=torch.int64, device=cache.device)
        src = tensor.to(cache.device)
        for i in range(header.num_layers):
            self.layout.scatter(header.first_layer + i, ids, src[i])
        for rank in self.layout.ranks:
            if rank.device.type == "cuda":
                torch.cuda.current_stream(rank.device).synchronize()
