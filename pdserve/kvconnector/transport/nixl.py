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
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from typing import Optional, Sequence

import numpy as np
import torch

from pdserve.kvconnector.transport.base import DataPlane, DataPlaneConfig, Fence, PeerWrites, dtype_name
from pdserve.wire.frames import Handshake

log = logging.getLogger(__name__)

POLL_S = 20e-6  # between polls of in-flight WRITEs: short against a layer's transfer, long against a poll


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

    def __init__(self, config: DataPlaneConfig, caches: Sequence[torch.Tensor]):
        super().__init__(config, caches)
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        first = self.caches[0]
        if first.device.type != "cuda":
            raise ValueError("kv_connector nixl needs the KV cache on a CUDA device")
        for c in self.caches:
            if not (c.is_contiguous() and c.shape == first.shape):
                raise ValueError("nixl: every layer's cache must be one contiguous [2, N, *block] tensor")
        self.device = first.device
        self.num_layers = len(self.caches)
        self.block_bytes = first[0, 0].numel() * first.element_size()
        self.part_bytes = first.stride(0) * first.element_size()  # K blocks, then V blocks
        # STRICT: setup (register, add a peer) runs on link threads while the sender thread posts
        conf = nixl_agent_config(backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = nixl_agent(f"pdserve-{os.getpid()}-{uuid.uuid4().hex[:8]}", conf)
        self.registered = self.agent.register_memory(self.caches)
        self._compute = torch.cuda.current_stream(self.device)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="kv-nixl", daemon=True)
        self._sender.start()

    # ---- consumer: export ----------------------------------------------------------------------------------
    def local_info(self) -> dict:
        return {
            "host": os.uname().nodename,
            "agent": self.agent.get_agent_metadata(),
            "device_id": self.device.index,
            "dtype": dtype_name(self.caches[0].dtype),
            "num_layers": self.num_layers,
            "block_bytes": self.block_bytes,
            "part_bytes": self.part_bytes,
            "layer_addrs": [c.data_ptr() for c in self.caches],
        }

    # ---- producer: connect ---------------------------------------------------------------------------------
    def check_peer(self, ours: Handshake, theirs: Handshake) -> str:
        if ours.role == "kv_consumer" or theirs.role != "kv_consumer":
            return ""
        info = theirs.data_plane or {}
        ours_shape = (dtype_name(self.caches[0].dtype), self.num_layers, self.block_bytes)
        theirs_shape = (info.get("dtype"), info.get("num_layers"), info.get("block_bytes"))
        if ours_shape != theirs_shape:
            return (
                f"the peer's cache (dtype, layers, block bytes) {theirs_shape} does not fit ours {ours_shape}"
            )
        return ""

    def open(self, link, ours: Handshake, theirs: Handshake, producer: bool) -> None:
        if producer:
            info = theirs.data_plane
            name = self.agent.add_remote_agent(info["agent"])
            link.state["nixl"] = _Peer(name, info)

    def close_link(self, link) -> None:
        peer = link.state.pop("nixl", None)
        if peer is not None:
            self._queue.put(("close", peer))  # after the WRITEs already queued for it

    # ---- producer: the forward thread ----------------------------------------------------------------------
    def stage(self, writes: PeerWrites) -> None:
        peer = writes.link.state.get("nixl")
        src = np.fromiter((b for s in writes.src for b in s), dtype=np.int64, count=writes.num_blocks)
        dst = np.fromiter((b for d in writes.dst for b in d), dtype=np.int64, count=writes.num_blocks)
        writes.staged = (peer, *block_runs(src, dst))
        self._compute = torch.cuda.current_stream(self.device)

    def write_layer(self, writes: PeerWrites, layer: int) -> None:
        if writes.staged[0] is None or writes.link.closed or not writes.num_blocks:
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
        inflight: list = []  # (peer, handle), in posting order
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
                handle = self._post(staged, layer)
                if handle is not None:
                    inflight.append((staged[0], handle))
                    posted += 1
            elif item and item[0] == "fence":
                item[1].compute_done_t = last_compute_t
                fences.append((item[1], posted, item[2]))
            elif item and item[0] == "close":
                self._drop_peer(item[1], inflight)
            fences = self._release_fences(fences, self._reap(inflight, posted))

    def _post(self, staged, layer: int):
        peer, src_starts, dst_starts, lengths = staged
        if peer.closed:
            return None
        bb = self.block_bytes
        local = run_descriptors(
            self.caches[layer].data_ptr(), self.part_bytes, bb, src_starts, lengths, self.device.index
        )
        remote = run_descriptors(
            peer.layer_addrs[layer], peer.part_bytes, bb, dst_starts, lengths, peer.device_id
        )
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
            return None
        return handle

    def _reap(self, inflight: list, posted: int) -> int:
        """Drop ended handles from the front of inflight (a failed one marks its peer) -> handles ended."""
        while inflight:
            peer, handle = inflight[0]
            state = self.agent.check_xfer_state(handle)
            if state == "PROC":
                break
            peer.failed |= state == "ERR"
            self.agent.release_xfer_handle(handle)
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
        while any(p is peer for p, _ in inflight):  # its WRITEs end (DONE or ERR) before the agent forgets it
            time.sleep(POLL_S)
            self._reap(inflight, 0)
        try:
            self.agent.remove_remote_agent(peer.name)
        except Exception:
            pass


class _Peer:
    def __init__(self, name: str, info: dict):
        self.name = name
        self.device_id = int(info["device_id"])
        self.part_bytes = int(info["part_bytes"])
        self.layer_addrs = [int(a) for a in info["layer_addrs"]]
        self.closed = False
        self.failed = False


def block_runs(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block ids -> runs where both sides are consecutive: (src start, dst start, length), in blocks.
    [4,5,6,9] -> [7,8,9,2] gives (4,7,3), (9,2,1)."""
    if src.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return src[starts], dst[starts], lengths


def run_descriptors(
    base: int, part_bytes: int, block_bytes: int, starts, lengths, device_id: int
) -> np.ndarray:
    """Runs of one layer -> [2 * runs, 3] (address, bytes, device): each run's K blocks, then its V blocks."""
    offsets = np.asarray(starts, dtype=np.uint64) * np.uint64(block_bytes)
    sizes = np.asarray(lengths, dtype=np.uint64) * np.uint64(block_bytes)
    addrs = np.concatenate((offsets, offsets + np.uint64(part_bytes))) + np.uint64(base)
    out = np.empty((addrs.size, 3), dtype=np.uint64)
    out[:, 0], out[:, 1], out[:, 2] = addrs, np.concatenate((sizes, sizes)), device_id
    return out
