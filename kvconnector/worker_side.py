"""The connector's worker side: moves bytes between the paged KV cache and the data plane.

Producer: `start_step(plans)` before the forward; `save_layer(l)` after layer l's attention wrote its KV gathers
that layer's blocks of every planned request into slot l of the request's staging buffer [L, 2, n, *block]
(one contiguous buffer per step and request, taken from a pool so registered memory is reused), and queues it
for that peer's sender thread. The sender keeps up to `max_inflight` chunks in flight per link; layers that
become ready while it waits are coalesced: consecutive layers of one request leave as one chunk, one message,
because per-layer messages alone leave a third of the link unused (DESIGN.md).
On a GPU the gather runs on the compute stream and records an event; the sender waits for the event, not for
the stream, so compute goes on while earlier layers travel.

Consumer: `scatter(header, tensor)` copies a received chunk [L, 2, n, *block] into the reserved blocks of
layers first_layer.. of the cache.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from kvconnector.scheduler_side import SendPlan
from kvconnector.transport import DataPlane, tensor_meta
from kvconnector.wire import Done, KVChunk

from kernels.dispatch import gather_blocks, scatter_blocks

log = logging.getLogger(__name__)


class BufferPool:
    """Reuses staging buffers by (shape, dtype, device); keeps at most max_bytes idle."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._idle = 0
        self._lock = threading.Lock()

    def get(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype, str(device))
        with self._lock:
            bucket = self._free.get(key)
            if bucket:
                t = bucket.pop()
                self._idle -= t.nbytes
                return t
        return torch.empty(tuple(shape), dtype=dtype, device=device)

    def put(self, t: torch.Tensor) -> None:
        with self._lock:
            if self._idle + t.nbytes > self.max_bytes:
                return
            self._free.setdefault((tuple(t.shape), t.dtype, str(t.device)), []).append(t)
            self._idle += t.nbytes


@dataclass(slots=True, eq=False)
class _Job:
    """One SendPlan being sent: stage [L, 2, n, *block], layers saved / completed so far."""
    plan: SendPlan
    stage: Optional[torch.Tensor]
    ids: Optional[torch.Tensor]
    num_layers: int
    completed: int = 0  # layers whose chunk finished on the data plane
    inflight: int = 0
    chunks: int = 0
    dropped: bool = False
    first_send: float = field(default=0.0)


@dataclass(slots=True)
class _Saved:
    job: _Job
    layer: int
    event: object  # torch.cuda.Event or None


class ProducerWorker:
    def __init__(self, kv_caches: Sequence[torch.Tensor], data_plane: DataPlane,
                 link_of: Callable[[object], object], is_active: Callable[[str], bool],
                 on_progress: Callable[[str, str, int], None], on_all_sent: Callable[[str, int], None],
                 max_inflight: int = 4, pool: Optional[BufferPool] = None):
        self.caches = list(kv_caches)  # per layer [2, num_blocks, block_size, num_kv_heads, head_dim]
        self.num_layers = len(self.caches)
        self.device = self.caches[0].device
        self.data_plane, self.link_of, self.is_active = data_plane, link_of, is_active
        self.on_progress, self.on_all_sent = on_progress, on_all_sent
        self.max_inflight = max_inflight
        self.pool = pool or BufferPool()
        self._jobs: list[_Job] = []
        self._senders: dict[object, _Sender] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ per step

    def start_step(self, plans: Sequence[SendPlan]) -> None:
        self._jobs = []
        for plan in plans:
            n = len(plan.local_block_ids)
            stage = ids = None
            if n:
                c = self.caches[0]
                stage = self.pool.get((self.num_layers, c.shape[0], n, *c.shape[2:]), c.dtype, self.device)
                ids = torch.tensor(plan.local_block_ids, dtype=torch.int64).to(self.device, non_blocking=True)
            self._jobs.append(_Job(plan, stage, ids, self.num_layers))

    def save_layer(self, layer: int) -> None:
        """After layer `layer` wrote this step's KV: gather its planned blocks and queue them for sending."""
        for job in self._jobs:
            if job.stage is not None:
                gather_blocks(self.caches[layer], job.ids, out=job.stage[layer])
        event = None
        if self.device.type == "cuda" and self._jobs:
            event = torch.cuda.Event()
            event.record()
        for job in self._jobs:
            if layer == self.num_layers - 1 and job.plan.last:
                self.on_progress(job.plan.request_id, "last_layer", 0)
            self._sender(job.plan.peer).put(_Saved(job, layer, event))

    def end_step(self) -> None:
        self._jobs = []

    # ------------------------------------------------------------------------------------------------ senders

    def _sender(self, peer) -> "_Sender":
        with self._lock:
            sender = self._senders.get(peer)
            if sender is None or sender.stopped:
                sender = self._senders[peer] = _Sender(self, peer)
            return sender

    def drop_peer(self, peer) -> None:
        with self._lock:
            sender = self._senders.pop(peer, None)
        if sender is not None:
            sender.stop()

    def close(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for s in senders:
            s.stop()


class _Sender:
    """One thread per peer link: coalesces saved layers into chunks and keeps up to max_inflight in flight."""

    def __init__(self, worker: ProducerWorker, peer):
        self.w, self.peer = worker, peer
        self.q: queue.Queue = queue.Queue()
        self.pending: list[_Saved] = []
        self.inflight = 0
        self.seq = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="kv-sender", daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        self.q.put(item)

    def stop(self) -> None:
        self.stopped = True
        self.q.put(None)

    def _loop(self) -> None:
        while True:
            items = [self.q.get()]
            while True:
                try:
                    items.append(self.q.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    return
                if isinstance(item, _Saved):
                    self.pending.append(item)
                else:  # (job, num_layers, nbytes, seconds, error) of a finished send
                    self._completed(*item)
            while self.pending and self.inflight < self.w.max_inflight:
                self._issue(self._take_group())

    def _take_group(self) -> list[_Saved]:
        """The first pending item and every pending later layer of the same job that continues it."""
        first = self.pending[0]
        group, rest, expect = [], [], first.layer
        for item in self.pending:
            if item.job is first.job and item.layer == expect:
                group.append(item)
                expect += 1
            else:
                rest.append(item)
        self.pending = rest
        return group

    def _issue(self, group: list[_Saved]) -> None:
        job = group[0].job
        plan, a, k = job.plan, group[0].layer, len(group)
        if job.dropped or not self.w.is_active(plan.request_id):
            job.dropped = True
            job.completed += k
            self._maybe_release(job)
            return
        if job.stage is None:  # nothing to move (the consumer held every block): only Done
            job.completed += k
            self._maybe_release(job)
            return
        if group[-1].event is not None:
            group[-1].event.synchronize()
        tensor = job.stage[a:a + k]
        header = KVChunk(request_id=plan.request_id, seq=self.seq, first_layer=a, num_layers=k,
                         block_ids=plan.remote_block_ids, tensor=tensor_meta(tensor))
        self.seq += 1
        link = self.w.link_of(self.peer)
        t0 = time.perf_counter()
        if job.chunks == 0:
            self.w.on_progress(plan.request_id, "first_send", 0)
        job.chunks += 1
        job.inflight += 1
        self.inflight += 1
        nbytes = tensor.numel() * tensor.element_size()
        try:
            if link is None:
                raise ConnectionError("no link to the peer")
            handle = self.w.data_plane.send(link, header, tensor)
        except Exception as exc:
            self._completed(job, k, nbytes, 0.0, exc)
            return
        handle.add_done_callback(lambda err: self.q.put((job, k, nbytes, time.perf_counter() - t0, err)))

    def _completed(self, job: _Job, k: int, nbytes: int, seconds: float, error) -> None:
        self.inflight -= 1
        job.inflight -= 1
        job.completed += k
        if error is not None:
            job.dropped = True
            log.warning("KV chunk of %s failed: %s", job.plan.request_id, error)
        else:
            self.w.on_progress(job.plan.request_id, "chunk", nbytes)
        self._maybe_release(job)

    def _maybe_release(self, job: _Job) -> None:
        if job.completed < job.num_layers or job.inflight:
            return
        if job.stage is not None:
            self.w.pool.put(job.stage)
            job.stage = None
        if job.plan.last and not job.dropped and self.w.is_active(job.plan.request_id):
            link = self.w.link_of(self.peer)
            try:
                link.send(Done(request_id=job.plan.request_id, num_chunks=job.chunks))
            except Exception as exc:  # the link's close handler aborts the request
                log.debug("Done for %s not sent: %s", job.plan.request_id, exc)
            self.w.on_all_sent(job.plan.request_id, job.chunks)


class ConsumerWorker:
    def __init__(self, kv_caches: Sequence[torch.Tensor]):
        self.caches = list(kv_caches)
        self.device = self.caches[0].device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def check(self, header: KVChunk, tensor: torch.Tensor) -> str:
        c = self.caches[0]
        want = (header.num_layers, c.shape[0], len(header.block_ids), *c.shape[2:])
        if tuple(tensor.shape) != want or tensor.dtype != c.dtype:
            return f"chunk {tuple(tensor.shape)} {tensor.dtype}, cache wants {want} {c.dtype}"
        if header.first_layer + header.num_layers > len(self.caches):
            return "layers beyond the cache"
        return ""

    def scatter(self, header: KVChunk, tensor: torch.Tensor) -> None:
        """Copy [L, 2, n, *block] into blocks header.block_ids of layers first_layer..; returns when landed."""
        ids = torch.tensor(header.block_ids, dtype=torch.int64)
        if self._stream is None:
            for i in range(header.num_layers):
                scatter_blocks(tensor[i], ids, self.caches[header.first_layer + i])
            return
        with torch.cuda.stream(self._stream):
            src = tensor.to(self.device, non_blocking=True)
            ids = ids.to(self.device, non_blocking=True)
            for i in range(header.num_layers):
                scatter_blocks(src[i], ids, self.caches[header.first_layer + i])
        self._stream.synchronize()
