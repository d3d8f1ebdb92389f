"""nixl data plane: one-sided WRITEs into the consumer's registered KV cache through NIXL (UCX inside).

Fabric: whatever UCX picks for the pair: cuda_ipc/NVLink between GPUs of one host, RDMA (InfiniBand, RoCE)
across hosts. This is the plane for nodes on different hosts; on one host cuda_ipc is the default because it
is stream-ordered (see below) and measured faster here (docs/kv_data_plane.md).

Consumer: registers every layer of its cache with its NIXL agent once, and sends the agent's metadata and the
cache's addresses only in its answer to an authenticated handshake (the trust boundary of cuda_ipc applies:
a peer holding the registration can write anywhere in the cache, not only into the blocks it was given).
Producer: registers its own cache, adds the consumer's agent, and per step turns each peer's block ids into
runs (consecutive source blocks that land on consecutive destination blocks): a run is one descriptor per K
and per V, so a layer is a few large descriptors when the caches' free lists hand out long runs, never one per
block (NIXL moves 8192 block-sized descriptors 60x slower than one of the same bytes).

Why a sender thread: a NIXL WRITE is posted from the host and is not ordered after the compute stream, so it
may start only once the layer's KV is in memory. The forward thread records the layer's CUDA event and puts
(event, layer) on a queue (no lock, no wait); the `kv-nixl` thread waits on the event (a blocking-sync event:
it sleeps), posts the layer's WRITE, and while WRITEs are in flight polls them with short sleeps (never
spinning with the GIL held). All agent calls but setup run on that thread. A fence completes once every WRITE
posted before it is DONE; the consumer hears the request's `Done` on the control link as with any plane.

Tensor parallelism: one agent per node, on rank 0, registers every rank's cache (a worker's cache is mapped
into rank 0 over CUDA IPC; NIXL registers and writes such memory like its own). The consumer's handshake
lists each rank's region and heads; the producer writes each consumer rank directly from the rank of ours
holding the same heads, or through a staging ring when none does (transport/nixl_routes.py).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pdserve.kernels.block_copy import BlockCopier
from pdserve.kvconnector.head_layout import HeadLayout
from pdserve.kvconnector.transport.base import DataPlane, DataPlaneConfig, Fence, PeerWrites, dtype_name
from pdserve.kvconnector.transport.nixl_routes import (
    Region,
    Route,
    SlotRing,
    block_runs,
    direct_descriptors,
    packed_descriptors,
    packed_groups,
    plan_routes,
)
from pdserve.wire.frames import Handshake

log = logging.getLogger(__name__)

POLL_S = 20e-6  # between polls of in-flight WRITEs: short against a layer's transfer, long against a poll
DEFAULT_STAGING_MB = 256  # per peer whose ranks hold other heads than ours: 8 layers of 8192 Llama-8B tokens


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except Exception:
        return False
    return True


class NixlFence(Fence):
    """Set by the sender thread once every WRITE posted before it is DONE (or failed)."""

    def __init__(self):
        self._done = threading.Event()
        self.failed = False
        self.compute_done_t: Optional[float] = None  # when the sender saw the last layer computed
        self.done_t: Optional[float] = None

    def wait(self) -> None:
        self._done.wait()
        if self.failed:
            raise RuntimeError("a NIXL WRITE failed")

    def exposed_s(self) -> Optional[float]:
        if self.compute_done_t is None or self.done_t is None:
            return None
        return max(self.done_t - self.compute_done_t, 0.0)


class NixlDataPlane(DataPlane):
    name = "nixl"

    def __init__(self, config: DataPlaneConfig, layout):
        self.layout = HeadLayout.of(layout)
        super().__init__(config, self.layout.layers)
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        first = self.caches[0]
        if first.device.type != "cuda":
            raise ValueError("kv_connector nixl needs the KV cache on a CUDA device")
        for rank in self.layout.ranks:
            for c in rank.layers:
                if not (c.is_contiguous() and c.shape == rank.layers[0].shape):
                    raise ValueError("nixl: every layer's cache must be one contiguous [2, N, *block] tensor")
        self.device = first.device
        self.num_layers = len(self.caches)
        self.head_bytes = first[0, 0].numel() * first.element_size() // first.shape[3]  # a block of one head
        # our ranks that first hold each head: the sources of every write (HeadLayout.sources)
        self.sources = [Region.of(r.layers, r.first_head, r.num_heads) for r in self.layout.sources]
        self._source_layers = [r.layers for r in self.layout.sources]
        self.staging_bytes = int(config.extra.get("staging_mb", DEFAULT_STAGING_MB)) << 20
        # STRICT: setup (register, add a peer) runs on link threads while the sender thread posts
        conf = nixl_agent_config(backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = nixl_agent(f"pdserve-{os.getpid()}-{uuid.uuid4().hex[:8]}", conf)
        self.registered = self.agent.register_memory([c for r in self.layout.ranks for c in r.layers])
        self._compute = torch.cuda.current_stream(self.device)
        self._pack_stream: Optional[torch.cuda.Stream] = None  # the sender's, with the first staging ring
        self._mapped_sources: Optional[list] = None  # our sources' caches on our device, for the pack copies
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="kv-nixl", daemon=True)
        self._sender.start()

    # ---- consumer: export ----------------------------------------------------------------------------------
    def local_info(self) -> dict:
        """Our agent and every rank's region (one without tensor parallelism)."""
        return {
            "host": os.uname().nodename,
            "agent": self.agent.get_agent_metadata(),
            "dtype": dtype_name(self.caches[0].dtype),
            "num_layers": self.num_layers,
            "head_bytes": self.head_bytes,
            "ranks": [Region.of(r.layers, r.first_head, r.num_heads).to_wire() for r in self.layout.ranks],
        }

    # ---- producer: connect ---------------------------------------------------------------------------------
    def check_peer(self, ours: Handshake, theirs: Handshake) -> str:
        if ours.role == "kv_consumer" or theirs.role != "kv_consumer":
            return ""
        info = theirs.data_plane or {}
        ours_shape = (dtype_name(self.caches[0].dtype), self.num_layers, self.head_bytes)
        theirs_shape = (info.get("dtype"), info.get("num_layers"), info.get("head_bytes"))
        if ours_shape != theirs_shape:
            return (
                f"the peer's cache (dtype, layers, bytes of a block's head) {theirs_shape} does not fit ours "
                f"{ours_shape}"
            )
        if not info.get("ranks"):
            return "the peer's handshake lists no ranks of its KV cache"
        try:
            plan_routes(self._source_heads(), [Region.from_wire(r) for r in info["ranks"]])
        except (KeyError, TypeError, ValueError) as exc:
            return f"the peer's ranks do not fit ours: {exc}"
        return ""

    def _source_heads(self) -> list[tuple[int, int]]:
        return [(r.first_head, r.num_heads) for r in self.sources]

    def open(self, link, ours: Handshake, theirs: Handshake, producer: bool) -> None:
        if producer:
            info = theirs.data_plane
            routes = plan_routes(self._source_heads(), [Region.from_wire(r) for r in info["ranks"]])
            peer = _Peer(self.agent.add_remote_agent(info["agent"]), routes)
            if any(r.direct is None for r in routes):
                self._open_staging(peer)
            link.state["nixl"] = peer

    def _open_staging(self, peer: "_Peer") -> None:
        """A registered ring of the peer ranks' block shape on our GPU, and per layer the copies that pack
        each packed route's heads into it from our ranks' caches (a worker's mapped onto our device)."""
        peer.groups = packed_groups(peer.routes)
        heads = {g[0].dst.num_heads for g in peer.groups}
        if len(heads) != 1:
            raise ValueError(f"the peer's ranks hold different numbers of heads {sorted(heads)}")
        first = self.caches[0]
        block = (first.shape[2], heads.pop(), first.shape[4])  # [block_size, the peer rank's heads, head_dim]
        slot_bytes = 2 * int(np.prod(block)) * first.element_size()
        slots = max(self.staging_bytes // slot_bytes, 1)
        staging = torch.zeros((2, slots, *block), dtype=first.dtype, device=self.device)
        peer.staging, peer.ring = staging, SlotRing(slots)
        peer.staging_reg = self.agent.register_memory([staging])
        peer.staging_region = Region.of([staging], 0, block[1])
        peer.slot_ids = torch.arange(slots, dtype=torch.int64, device=self.device)
        if self._mapped_sources is None:
            self._mapped_sources = [r.layers_on(self.device) for r in self.layout.sources]
        sources = self._mapped_sources
        peer.packers = [
            [
                [
                    BlockCopier(
                        sources[s.source][layer].narrow(3, s.src_at, s.heads),
                        staging.narrow(3, s.dst_at, s.heads),
                    )
                    for s in group[0].slices
                ]
                for group in peer.groups
            ]
            for layer in range(self.num_layers)
        ]
        if self._pack_stream is None:
            self._pack_stream = torch.cuda.Stream(self.device)

    def close_link(self, link) -> None:
        peer = link.state.pop("nixl", None)
        if peer is not None:
            self._queue.put(("close", peer))  # after the WRITEs already queued for it

    # ---- producer: the forward thread ----------------------------------------------------------------------
    def stage(self, writes: PeerWrites) -> None:
        peer = writes.link.state.get("nixl")
        src = np.fromiter((b for s in writes.src for b in s), dtype=np.int64, count=writes.num_blocks)
        dst = np.fromiter((b for d in writes.dst for b in d), dtype=np.int64, count=writes.num_blocks)
        src_ids = None
        if peer is not None and peer.ring is not None and src.size:  # the pack kernels read them
            src_ids = torch.from_numpy(src).pin_memory().to(self.device, non_blocking=True)
        writes.staged = _Staged(peer, src, dst, *block_runs(src, dst), src_ids)
        self._compute = torch.cuda.current_stream(self.device)

    def write_layer(self, writes: PeerWrites, layer: int) -> None:
        if writes.staged.peer is None or writes.link.closed or not writes.num_blocks:
            return
        ready = torch.cuda.Event(blocking=True)
        ready.record(self._compute)
        self._queue.put(("write", writes.staged, layer, ready))

    def fence(self, link) -> Fence:
        fence = NixlFence()
        self._queue.put(("fence", fence, link.state.get("nixl")))
        return fence

    def close(self) -> None:
        """Stop the sender once it has posted what it holds, then release the cache's registration and the
        agent here, not at interpreter exit: an agent torn down there (memory still registered, its threads
        still joinable) ended the process with "terminate called without an active exception"."""
        self._queue.put(None)
        if threading.current_thread() is not self._sender:
            self._sender.join(timeout=5.0)
        agent, registered = self.agent, self.registered
        self.registered = None
        if agent is None or registered is None:
            return  # closed before
        try:
            agent.deregister_memory(registered)
        except Exception as exc:  # noqa: BLE001 - closing anyway; say so and let the agent go
            log.warning("nixl: deregistering the KV cache failed: %s", exc)
        self.agent = None
        del agent  # the last reference: the agent's destructor joins its threads now

    # ---- the sender thread ---------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        inflight: list = []  # (peer, handle, holds a staging range), in posting order
        fences: list[tuple] = []  # (fence, n, peer): the fence waits for the first n handles posted
        posted = 0  # handles posted ever; inflight holds those not yet DONE
        last_compute_t: Optional[float] = None
        while True:
            try:
                item = self._queue.get(timeout=POLL_S) if inflight else self._queue.get()
            except queue.Empty:
                item = ()
            if item is None:
                return
            if item and item[0] == "write":
                _, staged, layer, ready = item
                ready.synchronize()  # the layer's KV is in memory; the thread sleeps meanwhile
                last_compute_t = time.monotonic()
                posted += self._post_layer(staged, layer, inflight)
            elif item and item[0] == "fence":
                item[1].compute_done_t = last_compute_t
                fences.append((item[1], posted, item[2]))
            elif item and item[0] == "close":
                self._drop_peer(item[1], inflight)
            fences = self._release_fences(fences, self._reap(inflight, posted))

    def _post_layer(self, staged: "_Staged", layer: int, inflight: list) -> int:
        """Post a layer's WRITEs to one peer -> handles posted: one for the direct routes, one per chunk of
        blocks for the packed routes (as many blocks as half the staging ring holds)."""
        peer = staged.peer
        if peer.closed:
            return 0
        posted = 0
        descs = direct_descriptors(
            self.sources, peer.routes, layer, staged.src_starts, staged.dst_starts, staged.lengths
        )
        if descs is not None:
            posted += self._post(peer, *descs, inflight, 0)
        if peer.ring is not None:  # a chunk's ranges fill at most half the ring: the next packs meanwhile
            chunk = max(peer.ring.capacity // (2 * len(peer.groups)), 1)
            for lo in range(0, staged.src.size, chunk):
                posted += self._post_packed(
                    peer, staged, layer, lo, min(lo + chunk, staged.src.size), inflight
                )
        return posted

    def _post_packed(
        self, peer: "_Peer", staged: "_Staged", layer: int, lo: int, hi: int, inflight: list
    ) -> int:
        """Blocks [lo, hi) of the step: wait for room in the ring (older WRITEs ending), pack each group's
        heads into it, wait for the copies (a blocking event: the thread sleeps), then one WRITE of whole
        blocks into every packed peer rank."""
        n = hi - lo
        rows = []  # the ring start of each group's packed blocks
        for _ in peer.groups:
            start = peer.ring.take(n)
            while start is None:
                time.sleep(POLL_S)
                self._reap(inflight, 0)
                start = peer.ring.take(n)
            rows.append(start)
        stream = self._pack_stream  # the layer is computed (the sender waited for it), the staged ids copied
        for i, start in enumerate(rows):
            for copy in peer.packers[layer][i]:
                copy(staged.src_ids[lo:hi], peer.slot_ids[start : start + n], stream.cuda_stream)
        packed_ev = torch.cuda.Event(blocking=True)
        packed_ev.record(stream)
        packed_ev.synchronize()
        local, remote = packed_descriptors(peer.staging_region, peer.groups, rows, staged.dst[lo:hi], layer)
        return self._post(peer, local, remote, inflight, len(rows))

    def _post(
        self, peer: "_Peer", local: np.ndarray, remote: np.ndarray, inflight: list, ring_ranges: int
    ) -> int:
        """One WRITE of these descriptors -> 1 if posted. ring_ranges: staging ranges it reads (given back
        when it ends)."""
        try:
            handle = self.agent.initialize_xfer(
                "WRITE",
                self.agent.get_xfer_descs(local, "VRAM"),
                self.agent.get_xfer_descs(remote, "VRAM"),
                peer.name,
            )
            if self.agent.transfer(handle) == "ERR":
                raise RuntimeError("NIXL refused the WRITE")
        except Exception:
            peer.failed = True
            for _ in range(ring_ranges):
                peer.ring.undo()  # the ranges just taken for this WRITE: the newest
            return 0
        inflight.append((peer, handle, ring_ranges))
        return 1

    def _reap(self, inflight: list, posted: int) -> int:
        """Drop ended handles from the front of inflight (a failed one marks its peer; its staging ranges are
        free again) -> handles ended."""
        while inflight:
            peer, handle, ring_ranges = inflight[0]
            state = self.agent.check_xfer_state(handle)
            if state == "PROC":
                break
            peer.failed |= state == "ERR"
            self.agent.release_xfer_handle(handle)
            for _ in range(ring_ranges):
                peer.ring.release()
            inflight.pop(0)
        return posted - len(inflight)

    @staticmethod
    def _release_fences(fences: list, ended: int) -> list:
        waiting = []
        for fence, upto, peer in fences:
            if upto <= ended:
                fence.failed = peer is None or peer.failed
                fence.done_t = time.monotonic()
                fence._done.set()
            else:
                waiting.append((fence, upto, peer))
        return waiting

    def _drop_peer(self, peer: "_Peer", inflight: list) -> None:
        peer.closed = True
        # its WRITEs end (DONE or ERR) before the agent forgets it
        while any(p is peer for p, _, _ in inflight):
            time.sleep(POLL_S)
            self._reap(inflight, 0)
        if peer.staging_reg is not None:
            try:
                self.agent.deregister_memory(peer.staging_reg)
            except Exception as exc:  # noqa: BLE001 - the ring is dropped anyway
                log.warning("nixl: deregistering a staging ring failed: %s", exc)
            peer.staging_reg = peer.staging = None
        try:
            self.agent.remove_remote_agent(peer.name)
        except Exception:
            pass


class _Peer:
    def __init__(self, name: str, routes: list[Route]):
        self.name = name
        self.routes = routes
        self.closed = False
        self.failed = False
        # a staging ring, only when some route is packed (nixl_routes.py)
        self.staging: Optional[torch.Tensor] = None
        self.staging_reg = None
        self.staging_region: Optional[Region] = None
        self.ring: Optional[SlotRing] = None
        self.slot_ids: Optional[torch.Tensor] = None
        self.groups: list[list[Route]] = []  # packed routes, grouped by the heads they get
        self.packers: list = []  # [layer][group] -> copies of its slices into the ring


@dataclass(slots=True)
class _Staged:
    """One step's blocks for one peer, as the sender reads them."""

    peer: Optional[_Peer]
    src: np.ndarray
    dst: np.ndarray
    src_starts: np.ndarray
    dst_starts: np.ndarray
    lengths: np.ndarray
    src_ids: Optional[torch.Tensor]  # src on the device, for the pack copies (packed routes only)
