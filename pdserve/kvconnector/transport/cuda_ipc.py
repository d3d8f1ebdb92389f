"""cuda_ipc data plane: the producer writes straight into the consumer's KV cache, mapped over CUDA IPC.

Fabric: GPUs of one host. Between two GPUs the copy kernel's stores cross NVLink (or PCIe) as peer writes;
when both processes share one GPU they are plain stores into the same HBM.

Consumer: exports its whole cache once (`local_info`: the IPC handle of the cache's allocation, offsets,
layout) and sends it only in its answer to a handshake whose frame carried a valid MAC (the trust boundary: a
peer holding the mapping can write anywhere in our cache, not only into the blocks it was given).
Producer, per layer, on the forward thread: record the compute stream's position, make the copy stream wait
for it, launch one `copy_blocks` on the copy stream (local blocks -> the peer's reserved blocks, every request
of the step for that peer at once). A fence is a blocking-sync event on the copy stream: its waiter sleeps, no
spinning. The next step's forward waits for the copy stream first, because the engine frees a prefilled
request's blocks at once and a later step may reuse them (the wait costs at most the last layer's copy).

Tensor parallelism (kvconnector/head_layout.py): a consumer of several ranks exports each rank's cache with
the KV heads it holds, and a producer of several ranks maps its own workers' caches the same way. Per layer,
each consumer rank then gets its heads from the producer ranks that hold them: a whole-block copy where both
hold the same heads (equal TP sizes), else a copy of the overlapping head slice (the same copy kernel, each
block as token rows of the slice: one launch per pair of ranks and layer; a small write, one launch per
pair over every layer after the last one, as without tensor parallelism).
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Optional, Sequence

import torch

from pdserve.engine.kv_cache import export_cuda_ipc, import_cuda_ipc
from pdserve.kernels.block_copy import BlockCopier
from pdserve.kvconnector.head_layout import HeadLayout
from pdserve.kvconnector.transport.base import (
    DataPlane,
    DataPlaneConfig,
    Fence,
    PeerWrites,
)
from pdserve.wire.frames import Handshake

log = logging.getLogger(__name__)

DEFAULT_BLOCK_WORDS = 1024
DEFAULT_COALESCE_BYTES = 8 << 20  # 4 blocks of Llama-8B's KV (all layers): ~25 us over NVLink


class _EventFence(Fence):
    def __init__(self, event: torch.cuda.Event, last_compute: Optional[torch.cuda.Event]):
        self.event, self.last_compute = event, last_compute

    def wait(self) -> None:
        self.event.synchronize()  # blocking-sync event: the thread sleeps with the GIL released

    def exposed_s(self) -> Optional[float]:
        if self.last_compute is None:
            return None
        return max(self.last_compute.elapsed_time(self.event), 0.0) / 1e3


class CudaIpcDataPlane(DataPlane):
    name = "cuda_ipc"

    def __init__(self, config: DataPlaneConfig, layout):
        self.layout = HeadLayout.of(layout)
        super().__init__(config, self.layout.layers)
        self._sources: Optional[list] = None  # our ranks' caches on this device, mapped once (TP)
        self.device = self.caches[0].device
        if self.device.type != "cuda":
            raise ValueError("kv_connector cuda_ipc needs the KV cache on a CUDA device")
        self.num_layers = len(self.caches)
        # kv_connector_extra_config {"copy": "triton" | "torch"}: one Triton launch per layer, or torch's
        # index_select + index_copy_ (two launches through the C++ dispatcher, a local staging copy between)
        self.copy = str(config.extra.get("copy", "triton"))
        if self.copy not in ("triton", "torch"):
            raise ValueError(f'cuda_ipc "copy" must be triton or torch, got {self.copy!r}')
        # {"block_words": n}: words each copy program moves (kernels.block_copy.BlockCopier). 1024 (8 KiB, a
        # quarter of a Llama-8B block) put more stores in flight than a whole block per program: 3-8% faster
        # pushes on 2x H200 (bench/results/logs/kv_transfer-h200-20261127-launch2.log.gz)
        self.block_words = int(config.extra.get("block_words", DEFAULT_BLOCK_WORDS))
        # {"coalesce_bytes": n}: a step's writes to a peer of at most n bytes (all layers) skip the per-layer
        # launches and go as one launch over every layer after the last one. Their exposed copy is then the
        # whole write (n / link speed: 25 us for the default over NVLink), and the forward thread saves 31
        # launches; larger writes go layer by layer, exposing only the last layer's copy. 0: never coalesce.
        self.coalesce_bytes = int(config.extra.get("coalesce_bytes", DEFAULT_COALESCE_BYTES))
        first = self.caches[0]
        head_bytes = first[:, :1].numel() // max(first.shape[3], 1) * first.element_size()
        self.block_bytes_all_layers = head_bytes * self.layout.num_kv_heads * self.num_layers  # every head
        self._stacked = stacked_layers(self.caches)  # every layer as one [2L, N, *blk] view, or None
        # high priority: a layer's copy is small and must not queue behind the next layers' compute kernels
        self._stream = torch.cuda.Stream(self.device, priority=-1)
        self._stream_handle = self._stream.cuda_stream
        self._compute = torch.cuda.current_stream(self.device)  # the forward's stream, read at each stage
        self._ready = [torch.cuda.Event() for _ in self.caches]  # reused each step: a wait captures the state
        self._copied: Optional[torch.cuda.Event] = None  # the copy stream after the last step's writes
        self._wrote = False  # this step launched copies
        self._retired: list = []  # mappings of closed links, released once the copy stream is past them
        self._retiring: list[tuple[torch.cuda.Event, list]] = []
        self._last_compute: Optional[torch.cuda.Event] = None  # timing event: the last layer computed
        self._load_copy_kernel()  # last: it needs the copy stream

    def _load_copy_kernel(self) -> None:
        """Compile the copy kernel (or load it from Triton's cache) at node start, not in the first request's
        forward: one copy of block 0 onto itself, with ids allocated apart (16-byte aligned, as stage() makes
        them), so the specialisation is the one every copier of this layout uses."""
        if self.copy != "triton" or self.caches[0].shape[1] == 0:
            return
        try:  # only an optimisation: a failure here leaves the first real launch to compile it
            with torch.cuda.device(self.device):
                src_ids, dst_ids = (torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(2))
                self._stream.wait_stream(
                    torch.cuda.current_stream(self.device)
                )  # after the cache's zero fill
                copier = BlockCopier(self.caches[0], self.caches[0], self.block_words)
                copier(src_ids, dst_ids, self._stream_handle)
                self._stream.synchronize()
        except Exception:
            log.warning("cuda_ipc: loading the copy kernel at start failed", exc_info=True)

    # ---- consumer: export ----------------------------------------------------------------------------------
    def local_info(self) -> dict:
        """Rank 0's cache; with tensor parallelism every rank's, each with the KV heads it holds."""
        if self.layout.tp_size == 1:
            return export_cuda_ipc(self.caches)
        ranks = [
            {**(r.ipc or export_cuda_ipc(r.layers)), "first_head": r.first_head, "num_heads": r.num_heads}
            for r in self.layout.ranks
        ]
        return {"host": os.uname().nodename, "ranks": ranks}

    # ---- producer: map -------------------------------------------------------------------------------------
    def check_peer(self, ours: Handshake, theirs: Handshake) -> str:
        """Producer side only: the consumer never touches the producer's GPU."""
        if ours.role == "kv_consumer":
            return ""
        info = theirs.data_plane or {}
        if theirs.role == "kv_consumer" and info.get("host") not in (None, os.uname().nodename):
            return f"cuda_ipc needs both nodes on one host (peer on {info.get('host')!r})"
        if theirs.device_uuid and peer_device_index(theirs.device_uuid) is None:
            return (
                f"the peer's GPU {theirs.device_uuid} is not visible to this process: CUDA_VISIBLE_DEVICES "
                f"must list every GPU of the nodes this one exchanges KV with"
            )
        index = peer_device_index(theirs.device_uuid) if theirs.device_uuid else None
        if (
            index is not None
            and index != self.device.index
            and not torch.cuda.can_device_access_peer(self.device, index)
        ):
            return f"GPU {self.device} cannot access the peer's GPU {index} (no P2P path)"
        return ""

    def open(self, link, ours: Handshake, theirs: Handshake, producer: bool) -> None:
        if producer and (self.layout.tp_size > 1 or "ranks" in (theirs.data_plane or {})):
            peer = [(first, n, self._map(info, n)) for first, n, info in _rank_exports(theirs.data_plane)]
            link.state["peer_cache"] = peer
            pairs = self._rank_pairs(peer)
            link.state["copiers"] = self._pair_copies(pairs)
            all_layers = self._pair_all_layers(pairs)
            if all_layers is not None:
                link.state["all_layers"] = all_layers
        elif producer:
            peer = self._map(theirs.data_plane)
            link.state["peer_cache"] = peer
            link.state["copiers"] = [
                self._copier(src, dst) for src, dst in zip(self.caches, peer, strict=False)
            ]
            peer_stacked = stacked_layers(peer)
            if self._stacked is not None and peer_stacked is not None and self.copy == "triton":
                copier = BlockCopier(self._stacked, peer_stacked, self.block_words)
                link.state["all_layers"] = [partial(copier, stream=self._stream_handle)]

    def _copier(self, src: torch.Tensor, dst: torch.Tensor):
        if self.copy == "triton":
            return BlockCopier(src, dst, self.block_words)
        src_w, dst_w = src.flatten(2).view(torch.int64), dst.flatten(2).view(torch.int64)
        return lambda src_ids, dst_ids: dst_w.index_copy_(1, dst_ids, src_w.index_select(1, src_ids))

    def _source_pieces(self) -> list:
        """(first head, heads, per-layer caches) of the first of our ranks holding each head, all on our
        device: rank 0's own, the workers' mapped from their exports."""
        if self._sources is None:
            self._sources = [
                (r.first_head, r.num_heads, r.layers_on(self.device)) for r in self.layout.sources
            ]
        return self._sources

    def _rank_pairs(self, peer: list) -> list[tuple]:
        """(our layers, head offset, peer rank's layers, head offset, heads, whole blocks) for each pair of
        one of our ranks and a peer rank that share heads."""
        pairs = []
        for d_first, d_n, d_layers in peer:
            for s_first, s_n, s_layers in self._source_pieces():
                lo, hi = max(d_first, s_first), min(d_first + d_n, s_first + s_n)
                if lo < hi:
                    whole = s_n == d_n == hi - lo
                    pairs.append((s_layers, lo - s_first, d_layers, lo - d_first, hi - lo, whole))
        return pairs

    def _pair_copy(self, src: torch.Tensor, dst: torch.Tensor, s_at: int, d_at: int, n: int, whole: bool):
        """fn(src_ids, dst_ids) copying heads s_at..+n of src's blocks into heads d_at..+n of dst's."""
        if not whole:  # the overlapping heads: a head slice of either cache
            src, dst = src.narrow(3, s_at, n), dst.narrow(3, d_at, n)
        if self.copy == "triton":
            return partial(BlockCopier(src, dst, self.block_words), stream=self._stream_handle)
        return partial(_copy_heads, src, dst)

    def _pair_copies(self, pairs: list[tuple]) -> list[list]:
        """Per layer, the copies that fill every peer rank's heads."""
        return [
            [
                self._pair_copy(s[layer], d[layer], s_at, d_at, n, whole)
                for s, s_at, d, d_at, n, whole in pairs
            ]
            for layer in range(self.num_layers)
        ]

    def _pair_all_layers(self, pairs: list[tuple]) -> Optional[list]:
        """Per pair, one copy over every layer at once (small writes, see coalesce_bytes), or None when some
        rank's layers are not back to back in one allocation."""
        if self.copy != "triton":
            return None
        stacked = [
            (stacked_layers(s), s_at, stacked_layers(d), d_at, n, w) for s, s_at, d, d_at, n, w in pairs
        ]
        if any(s is None or d is None for s, _, d, *_ in stacked):
            return None
        return [self._pair_copy(s, d, s_at, d_at, n, w) for s, s_at, d, d_at, n, w in stacked]

    def _map(self, info: dict, num_heads: Optional[int] = None) -> list[torch.Tensor]:
        """The peer's per-layer caches as tensors of this process, on our device (peer access is enabled by
        opening the handle here: CUDA maps the peer GPU's memory into our device's address space).
        num_heads: the KV heads that cache holds (a tensor-parallel rank's), default ours."""
        layers = import_cuda_ipc(info, self.device)
        ours = self.caches[0]
        want = (ours.shape[0], ours.shape[2], num_heads or ours.shape[3], ours.shape[4])
        if len(layers) != self.num_layers or (layers[0].shape[0], *layers[0].shape[2:]) != want:
            raise ValueError(f"the peer's cache {tuple(layers[0].shape)} x {len(layers)} does not fit ours")
        return layers

    def close_link(self, link) -> None:
        """Any thread. The mapping is not dropped here: copies the forward thread launched into it may still
        be queued, and unmapping under them would fault this process's context. begin_step retires it."""
        self._retired.append(
            (
                link.state.pop("copiers", None),
                link.state.pop("all_layers", None),
                link.state.pop("peer_cache", None),
            )
        )

    # ---- producer: the forward thread ----------------------------------------------------------------------
    def begin_step(self) -> None:
        if self._copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied)
            self._copied = None
        if self._retired or self._retiring:
            self._retire_mappings()

    def _retire_mappings(self) -> None:
        """Forward thread (the only one that launches copies): drop mappings once the copy stream has passed
        every copy launched before their link closed, so a dead peer's memory is let go (its GPU needs it
        back)."""
        if self._retired:
            retired, self._retired = self._retired, []
            passed = torch.cuda.Event()
            passed.record(self._stream)
            self._retiring.append((passed, retired))
        self._retiring = [(ev, maps) for ev, maps in self._retiring if not ev.query()]

    def stage(self, writes: PeerWrites) -> None:
        n = writes.num_blocks
        width = n + (
            n & 1
        )  # an even row keeps the destination ids 16-byte aligned (the copier's direct launch)
        flat = [b for s in writes.src for b in s] + [0] * (width - n)
        flat += [b for d in writes.dst for b in d] + [0] * (width - n)
        ids = torch.tensor(flat, dtype=torch.int64).pin_memory().to(self.device, non_blocking=True)
        ids.record_stream(self._stream)  # read by the copy stream, possibly after the step has let go of it
        coalesce = (
            "all_layers" in writes.link.state and n * self.block_bytes_all_layers <= self.coalesce_bytes
        )
        # source ids, destination ids (every request of the peer), and whether to copy all layers at once
        writes.staged = (ids[:n], ids[width : width + n], coalesce)
        self._compute = torch.cuda.current_stream(self.device)

    def write_layer(self, writes: PeerWrites, layer: int) -> None:
        copiers = writes.link.state.get("copiers")
        if copiers is None or writes.link.closed or not writes.num_blocks:
            return
        src_ids, dst_ids, coalesce = writes.staged
        last = layer == self.num_layers - 1
        if coalesce and not last:
            return  # copied with every other layer after the last one
        if last:  # a fresh timing event: fences measure the exposed copy against it
            ready = self._last_compute = torch.cuda.Event(enable_timing=True)
        else:
            ready = self._ready[layer]
        ready.record(self._compute)
        self._stream.wait_event(ready)
        if coalesce:
            copies = writes.link.state.get("all_layers")
            if copies is None:  # the link closed since stage(): nothing may be written into it now
                return
            for copy in copies:  # launched on the copy stream by handle
                copy(src_ids, dst_ids)
        elif isinstance(copiers[layer], list):  # tensor parallelism: one copy per pair of ranks
            if self.copy == "triton":  # launched on the copy stream by handle
                for copy in copiers[layer]:
                    copy(src_ids, dst_ids)
            else:
                with torch.cuda.stream(self._stream):
                    for copy in copiers[layer]:
                        copy(src_ids, dst_ids)
        elif self.copy == "triton":  # launched on the copy stream by handle: no stream switch on this thread
            copiers[layer](src_ids, dst_ids, self._stream_handle)
        else:
            with torch.cuda.stream(self._stream):
                copiers[layer](src_ids, dst_ids)
        self._wrote = True

    def end_step(self) -> None:
        if (
            self._wrote
        ):  # the next forward waits for these copies (see begin_step), even after a failed forward
            self._wrote = False
            self._copied = torch.cuda.Event()
            self._copied.record(self._stream)

    def fence(self, link) -> Fence:
        event = torch.cuda.Event(blocking=True, enable_timing=True)
        event.record(self._stream)
        return _EventFence(event, self._last_compute)


def _rank_exports(info: dict) -> list[tuple[int, int, dict]]:
    """(first head, heads, export) per rank of a consumer's handshake info; one rank holds all heads."""
    if "ranks" in info:
        return [(r["first_head"], r["num_heads"], r) for r in info["ranks"]]
    return [(0, info["shape"][3], info)]


def _copy_heads(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """Blocks src_ids of a head-narrowed layer view into blocks dst_ids of another."""
    dst.index_copy_(1, dst_ids, src.index_select(1, src_ids))


def stacked_layers(layers: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """Per-layer caches [P, N, *blk] lying back to back in one allocation (the engine's [L, P, N, *blk]) as
    one [L * P, N, *blk] view, so one copy launch can cover every layer; None when they do not."""
    first = layers[0]
    nbytes = first.numel() * first.element_size()
    for i, t in enumerate(layers):
        if not t.is_contiguous() or t.shape != first.shape or t.data_ptr() != first.data_ptr() + i * nbytes:
            return None
    whole = torch.empty(0, dtype=first.dtype, device=first.device)
    whole.set_(
        first.untyped_storage(), first.storage_offset(), (len(layers) * first.shape[0], *first.shape[1:])
    )
    return whole


def peer_device_index(uuid: str) -> Optional[int]:
    """The local index of the GPU with this UUID, None when this process cannot see it."""
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    return None
