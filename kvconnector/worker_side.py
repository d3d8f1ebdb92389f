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


def _bucket(nbytes: int) -> int:
    """Capacity for a request of nbytes: a power of two up to 1 MiB, above that the next multiple of an eighth of
    the power of two below (at most 12.5% unused), so buffers of nearby sizes are the same buffer."""
    if nbytes <= 1 << 20:
        return 1 << max(nbytes - 1, 0).bit_length()
    step = 1 << (nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


class BufferPool:
    """Staging buffers, reused: flat byte buffers in size buckets, handed out as views of the shape asked for.

    A chunk of k layers and one of k+1 layers, or two prompts of nearly the same length, get the same memory
    back, so the data plane sees registered memory again (UCX caches registrations and cuda_ipc mappings per
    allocation; a fresh 8 MB buffer's first send ran at 2.2 GB/s, DESIGN.md). Keeps at most max_bytes idle."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a lent view -> its flat buffer
        self._idle = 0
        self._lock = threading.Lock()
        self.allocations = 0  # flat buffers made (a test's handle on reuse)

    def get(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = tuple(int(x) for x in shape)
        nbytes = dtype.itemsize
        for x in shape:
            nbytes *= x
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=device)
        dev, size = str(device), _bucket(nbytes)
        with self._lock:
            # the smallest idle buffer that fits and is at most twice the bucket (a chunk of k < L layers reuses
            # the buffer of a full request's L layers only while that wastes no more than half of it)
            fits = [k for k, v in self._free.items() if v and k[0] == dev and size <= k[1] <= 2 * size]
            base = self._free[min(fits, key=lambda k: k[1])].pop() if fits else None
            if base is not None:
                self._idle -= base.numel()
        if base is None:
            base = torch.empty(size, dtype=torch.uint8, device=device)
            self.allocations += 1
        view = base[:nbytes].view(dtype).view(shape)
        with self._lock:
            self._lent[view.data_ptr()] = base
        return view

    def put(self, t: torch.Tensor) -> None:
        with self._lock:
            base = self._lent.pop(t.data_ptr(), None)
            if base is None or self._idle + base.numel() > self.max_bytes:
                return
            self._free.setdefault((str(base.device), base.numel()), []).append(base)
            self._idle += base.numel()


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
        """The first pending item (once its gather has run) and every pending later layer of the same job that
        continues it and is ready too: coalesce what is ready, never wait for what is not.

        On a GPU the host runs ahead of the device, so save_layer() of every layer is called long before the
        layers are computed; grouping by "saved" rather than "ready" would hold layer 0's bytes back until the
        last layer ran and send the whole request as one chunk after the prefill: all of it exposed."""
        first = self.pending[0]
        if first.event is not None:
            first.event.synchronize()
        group, rest, expect = [], [], first.layer
        for item in self.pending:
            if item.job is first.job and item.layer == expect and (
                    item is first or item.event is None or item.event.query()):
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
    def __init__(self, kv_caches: Sequence[torch.Tensor], full: Optional[torch.Tensor] = None):
        self.caches = list(kv_caches)
        # the engine's one [L, 2, N, *block] tensor when it has one: a chunk of k layers is then scattered by one
        # kernel (index_copy_ over the block dim), not k launches, which matters for the big last chunk of a
        # back-to-back push
        self.full = full if full is not None and full.dim() == 6 and len(full) == len(self.caches) else None
        self.device = self.caches[0].device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ids: dict[tuple, torch.Tensor] = {}  # block ids on the device, by request step (same every chunk)

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
        a, k = header.first_layer, header.num_layers
        if self._stream is None:
            ids = torch.tensor(header.block_ids, dtype=torch.int64)
            if self.full is not None and k > 1:
                self.full[a:a + k].index_copy_(2, ids, tensor)
                return
            for i in range(k):
                scatter_blocks(tensor[i], ids, self.caches[a + i])
            return
        key = tuple(header.block_ids)
        with torch.cuda.stream(self._stream):
            ids = self._ids.get(key)
            if ids is None:  # every chunk of a step carries the same blocks: one upload per step, not per chunk
                if len(self._ids) >= 64:
                    self._ids.pop(next(iter(self._ids)))
                ids = self._ids[key] = torch.tensor(key, dtype=torch.int64).pin_memory().to(self.device,
                                                                                          non_blocking=True)
            src = tensor.to(self.device, non_blocking=True)
            if self.full is not None and k > 1:
                self.full[a:a + k].index_copy_(2, ids, src)
            else:
                for i in range(k):
                    scatter_blocks(src[i], ids, self.caches[a + i])
        self._stream.synchronize()
