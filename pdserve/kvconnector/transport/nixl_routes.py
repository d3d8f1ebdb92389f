"""How the nixl plane writes into a consumer whose tensor-parallel ranks hold other KV heads than ours.

NIXL moves bytes between registered regions as descriptors, and costs about 7 us per descriptor, so a
write must stay a few large ones (docs/kv_data_plane.md). A consumer rank holding exactly the heads one of
our ranks holds (equal TP sizes) gets whole blocks from that rank's cache: a *direct* route, descriptors per
run of blocks as without tensor parallelism. Any other rank would need a head slice of every token slot, one
descriptor per token: its route is *packed* instead. A copy kernel gathers the rank's heads from our ranks
into a registered staging ring on our GPU, laid out as the consumer rank's blocks, and one WRITE per layer
sends those whole blocks on. The consumer does nothing per layer either way.

Pure planning and bookkeeping here (no NIXL, no GPU), so CPU tests cover it; transport/nixl.py drives it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Region:
    """One rank's cache as the nixl plane addresses it: per layer [2, N, block_size, heads, head_dim]."""

    device_id: int
    first_head: int
    num_heads: int
    block_bytes: int  # one block of K (or V) of this rank's heads
    part_bytes: int  # from a layer's K blocks to its V blocks
    layer_addrs: tuple[int, ...]

    @classmethod
    def of(cls, layers, first_head: int, num_heads: int) -> "Region":
        first = layers[0]
        return cls(
            device_id=first.device.index or 0,  # host memory (the CPU tests) has no index
            first_head=first_head,
            num_heads=num_heads,
            block_bytes=first[0, 0].numel() * first.element_size(),
            part_bytes=first.stride(0) * first.element_size(),
            layer_addrs=tuple(t.data_ptr() for t in layers),
        )

    def descriptors(self, layer: int, starts, lengths) -> np.ndarray:
        """Runs of blocks of one layer of this region -> its NIXL descriptors (run_descriptors)."""
        return run_descriptors(
            self.layer_addrs[layer], self.part_bytes, self.block_bytes, starts, lengths, self.device_id
        )

    def to_wire(self) -> dict:
        return {
            "device_id": self.device_id,
            "first_head": self.first_head,
            "num_heads": self.num_heads,
            "block_bytes": self.block_bytes,
            "part_bytes": self.part_bytes,
            "layer_addrs": list(self.layer_addrs),
        }

    @classmethod
    def from_wire(cls, info: dict) -> "Region":
        return cls(
            device_id=int(info["device_id"]),
            first_head=int(info["first_head"]),
            num_heads=int(info["num_heads"]),
            block_bytes=int(info["block_bytes"]),
            part_bytes=int(info["part_bytes"]),
            layer_addrs=tuple(int(a) for a in info["layer_addrs"]),
        )


@dataclass(frozen=True)
class Slice:
    """Heads [src_at, src_at + heads) of our source rank `source` land at [dst_at, dst_at + heads) of the
    consumer rank's blocks."""

    source: int
    src_at: int
    dst_at: int
    heads: int


@dataclass(frozen=True)
class Route:
    """How one consumer rank gets its heads: straight from source rank `direct`, or packed from slices."""

    dst: Region
    direct: Optional[int] = None
    slices: tuple[Slice, ...] = field(default=())


def plan_routes(sources: list[tuple[int, int]], dst: list[Region]) -> list[Route]:
    """sources: (first head, heads) of each of our ranks that first holds its heads, covering every head once
    (HeadLayout.sources). One route per consumer rank, replicas of a replicated head included."""
    routes = []
    for region in dst:
        d_lo, d_hi = region.first_head, region.first_head + region.num_heads
        same = [i for i, (first, n) in enumerate(sources) if (first, n) == (d_lo, region.num_heads)]
        if same:
            routes.append(Route(region, direct=same[0]))
            continue
        slices = []
        for i, (first, n) in enumerate(sources):
            lo, hi = max(d_lo, first), min(d_hi, first + n)
            if lo < hi:
                slices.append(Slice(i, lo - first, lo - d_lo, hi - lo))
        if sum(s.heads for s in slices) != region.num_heads:
            raise ValueError(f"our ranks do not hold the peer rank's heads {d_lo}..{d_hi}")
        routes.append(Route(region, slices=tuple(slices)))
    return routes


def packed_groups(routes: list[Route]) -> list[list[Route]]:
    """The packed routes grouped by the heads they get: replicas of a head (more peer ranks than heads) share
    one packed copy in the staging ring."""
    groups: dict[tuple[int, int], list[Route]] = {}
    for route in routes:
        if route.direct is None:
            groups.setdefault((route.dst.first_head, route.dst.num_heads), []).append(route)
    return list(groups.values())


def direct_descriptors(
    sources: list[Region], routes: list[Route], layer: int, src_starts, dst_starts, lengths
) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(local, remote) descriptors of one layer's runs for every direct route, None when there is none."""
    direct = [r for r in routes if r.direct is not None]
    if not direct:
        return None
    local = [sources[r.direct].descriptors(layer, src_starts, lengths) for r in direct]
    remote = [r.dst.descriptors(layer, dst_starts, lengths) for r in direct]
    return np.concatenate(local), np.concatenate(remote)


def packed_descriptors(
    staging: Region, groups: list[list[Route]], ring_starts: list[int], dst_blocks: np.ndarray, layer: int
) -> tuple[np.ndarray, np.ndarray]:
    """(local, remote) descriptors of one chunk of packed blocks: group g's blocks lie in the staging ring at
    slots ring_starts[g]..+n, each bound for dst_blocks of every peer rank in the group (a replicated head's
    ranks read the same slots)."""
    local, remote = [], []
    for group, start in zip(groups, ring_starts, strict=True):
        slots = np.arange(start, start + dst_blocks.size, dtype=np.int64)
        s_starts, d_starts, lengths = block_runs(slots, dst_blocks)
        for route in group:
            local.append(staging.descriptors(0, s_starts, lengths))
            remote.append(route.dst.descriptors(layer, d_starts, lengths))
    return np.concatenate(local), np.concatenate(remote)


class SlotRing:
    """Block slots of a staging buffer, handed out as contiguous ranges and given back oldest first (the
    order the WRITEs that read them end in). `take` returns None while the ring has no room: the sender then
    waits for older WRITEs (back-pressure)."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"a staging ring needs at least one slot, got {capacity}")
        self.capacity = capacity
        self._taken: deque[tuple[int, int]] = deque()  # (start, end) in taking order

    def take(self, k: int) -> Optional[int]:
        if not 0 < k <= self.capacity:
            raise ValueError(f"cannot take {k} of a ring of {self.capacity} slots")
        start = self._room(k)
        if start is not None:
            self._taken.append((start, start + k))
        return start

    def _room(self, k: int) -> Optional[int]:
        if not self._taken:
            return 0
        oldest, newest_end = self._taken[0][0], self._taken[-1][1]
        if self._taken[-1][0] < oldest:  # wrapped: free is the gap between the newest and the oldest
            return newest_end if oldest - newest_end >= k else None
        if self.capacity - newest_end >= k:
            return newest_end
        return 0 if oldest >= k else None  # wrap, leaving the end unused until the ring passes it

    def release(self) -> None:
        """The oldest range is free again."""
        self._taken.popleft()

    def undo(self) -> None:
        """The newest range is free again (its WRITE was never posted)."""
        self._taken.pop()

    @property
    def in_use(self) -> int:
        return len(self._taken)


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
