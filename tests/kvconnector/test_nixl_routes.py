"""The nixl plane between tensor-parallel sizes, without NIXL: which producer rank feeds each consumer rank
(direct or packed), the staging ring's bookkeeping and back-pressure, and the whole write on host memory. The
test packs with the plane's copy kernel (Triton's interpreter) and carries out every descriptor the plane
would post as a memmove, so the descriptor math and the ring layout are checked byte for byte."""

import ctypes
import random

import numpy as np
import pytest
import torch

from pdserve.engine.tensor_parallel import kv_head_range
from pdserve.kernels._common import interpreting
from pdserve.kernels.block_copy import BlockCopier
from pdserve.kvconnector.transport.nixl_routes import (
    Region,
    SlotRing,
    block_runs,
    direct_descriptors,
    packed_descriptors,
    packed_groups,
    plan_routes,
)

HEADS = 4
PAIRS = [(1, 1), (2, 2), (2, 1), (1, 2), (4, 2), (2, 4), (1, 8), (8, 2), (4, 8)]


def _ranges(tp: int) -> list[tuple[int, int]]:
    return [kv_head_range(HEADS, r, tp) for r in range(tp)]


def _sources(tp: int) -> list[tuple[int, int]]:
    """The first rank holding each head (HeadLayout.sources)."""
    out, nxt = [], 0
    for first, n in _ranges(tp):
        if first == nxt:
            out.append((first, n))
            nxt += n
    return out


def _regions(ranges, block_bytes_per_head=64) -> list[Region]:
    return [
        Region(0, first, n, n * block_bytes_per_head, 1 << 20, (i << 24,))
        for i, (first, n) in enumerate(ranges)
    ]


@pytest.mark.parametrize("p,d", PAIRS, ids=[f"{p}to{d}" for p, d in PAIRS])
def test_routes_cover_each_peer_rank_once(p, d):
    routes = plan_routes(_sources(p), _regions(_ranges(d)))
    assert len(routes) == d  # every consumer rank, replicas of a replicated head included
    for route in routes:
        want = list(range(route.dst.first_head, route.dst.first_head + route.dst.num_heads))
        if route.direct is not None:
            assert _sources(p)[route.direct] == (route.dst.first_head, route.dst.num_heads)
            continue
        got = []
        for s in sorted(route.slices, key=lambda s: s.dst_at):
            first = _sources(p)[s.source][0]
            got += [first + s.src_at + h for h in range(s.heads)]
            assert s.dst_at + s.heads <= route.dst.num_heads
        assert got == want
    direct = sum(r.direct is not None for r in routes)
    assert direct == (d if p == d or (p >= HEADS and d >= HEADS) else 0)


def test_replicas_share_one_packed_copy():
    routes = plan_routes(_sources(1), _regions(_ranges(8)))  # 8 ranks, 4 heads: two ranks per head
    groups = packed_groups(routes)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    assert all(len({(r.dst.first_head, r.dst.num_heads) for r in g}) == 1 for g in groups)


def test_routes_refuse_heads_we_do_not_hold():
    with pytest.raises(ValueError, match="do not hold"):
        plan_routes([(0, 2)], _regions([(0, 2), (2, 2)]))


def test_ring_hands_out_disjoint_ranges_and_waits_when_full():
    ring = SlotRing(10)
    assert ring.take(4) == 0 and ring.take(4) == 4
    assert ring.take(3) is None  # back-pressure: 2 free slots at the end, none at the start
    ring.release()  # the oldest (0..4) ends
    assert ring.take(3) == 0  # wraps, leaving 8..10 unused
    assert ring.take(2) is None  # the gap between the newest (..3) and the oldest (4..) is 1
    assert ring.take(1) == 3
    ring.undo()  # a WRITE that was never posted gives its range straight back
    assert ring.in_use == 2
    with pytest.raises(ValueError):
        ring.take(11)


@pytest.mark.parametrize("seed", range(4))
def test_ring_never_overlaps_live_ranges(seed):
    rng, ring, live = random.Random(seed), SlotRing(17), []
    for _ in range(400):
        if live and rng.random() < 0.45:
            ring.release()
            live.pop(0)
            continue
        k = rng.randint(1, 8)
        start = ring.take(k)
        if start is None:
            assert live, "an empty ring refused"
            continue
        assert 0 <= start and start + k <= 17
        assert all(start + k <= s or e <= start for s, e in live)
        live.append((start, start + k))
    assert ring.in_use == len(live)


def _take_waiting(ring: SlotRing, k: int, posted: list[int]) -> int:
    """As the sender does: while the ring has no room, the oldest posted WRITE ends and frees its ranges."""
    start = ring.take(k)
    while start is None:
        assert posted, "no room and nothing in flight: the chunk is too large for the ring"
        for _ in range(posted.pop(0)):
            ring.release()
        start = ring.take(k)
    return start


def _apply(local: np.ndarray, remote: np.ndarray) -> None:
    """Carry out NIXL WRITE descriptors on host memory: local [i] -> remote [i], same sizes."""
    assert local.shape == remote.shape and (local[:, 1] == remote[:, 1]).all()
    for (src, size, _), (dst, _, _) in zip(local.tolist(), remote.tolist(), strict=True):
        ctypes.memmove(dst, src, size)


@pytest.mark.parametrize("p,d", PAIRS, ids=[f"{p}to{d}" for p, d in PAIRS])
def test_write_between_tp_sizes_on_host_memory(p, d):
    """Every consumer rank ends up holding exactly its heads of the producer's blocks, written as the plane
    writes them: direct runs from the rank holding the same heads, or packed into a ring (odd ring starts,
    several chunks) and written as whole blocks; blocks not written stay zero."""
    if not interpreting():
        pytest.skip("the pack copies run Triton on host tensors only in its interpreter (TRITON_INTERPRET=1)")
    layers, blocks, bs, dim = 2, 12, 3, 4
    gen = torch.Generator().manual_seed(p * 10 + d)
    full = [torch.randn((2, blocks, bs, HEADS, dim), generator=gen) for _ in range(layers)]
    src_ranges = _sources(p)
    src = [[t[..., f : f + n, :].contiguous() for t in full] for f, n in src_ranges]
    dst = [[torch.zeros((2, blocks + 3, bs, n, dim)) for _ in range(layers)] for _, n in _ranges(d)]
    sources = [Region.of(layers_, f, n) for layers_, (f, n) in zip(src, src_ranges, strict=True)]
    routes = plan_routes(src_ranges, [Region.of(t, f, n) for t, (f, n) in zip(dst, _ranges(d), strict=True)])
    src_ids = np.array([7, 8, 9, 2, 0, 11, 5], dtype=np.int64)
    dst_ids = np.array([1, 2, 3, 14, 6, 0, 9], dtype=np.int64)
    s_starts, d_starts, lengths = block_runs(src_ids, dst_ids)
    groups = packed_groups(routes)
    heads = groups[0][0].dst.num_heads if groups else 1
    slots_total = 4 * max(len(groups), 1) + 1  # two chunks of two blocks per group in flight, plus one
    staging = torch.zeros((2, slots_total, bs, heads, dim))
    ring, staged = SlotRing(slots_total), Region.of([staging], 0, heads)
    ring.take(1)  # the ring's first slot is busy: packed blocks start at odd slots, then wrap
    posted = [1]  # ranges each posted WRITE holds, oldest first
    for layer in range(layers):
        descs = direct_descriptors(sources, routes, layer, s_starts, d_starts, lengths)
        if descs is not None:
            _apply(*descs)
        for lo in range(0, src_ids.size, 2):  # chunks of two blocks
            hi = min(lo + 2, src_ids.size)
            starts = [_take_waiting(ring, hi - lo, posted) for _ in groups]
            for group, start in zip(groups, starts, strict=True):
                slots = torch.arange(start, start + hi - lo)
                for s in group[0].slices:
                    BlockCopier(
                        src[s.source][layer].narrow(3, s.src_at, s.heads),
                        staging.narrow(3, s.dst_at, s.heads),
                    )(torch.from_numpy(src_ids[lo:hi]), slots)
            if groups:
                _apply(*packed_descriptors(staged, groups, starts, dst_ids[lo:hi], layer))
            posted.append(len(groups))
    for (first, n), rank in zip(_ranges(d), dst, strict=True):
        for layer in range(layers):
            want = torch.zeros_like(rank[layer])
            want[:, dst_ids] = full[layer][:, src_ids, :, first : first + n]
            assert torch.equal(rank[layer], want), f"rank holding heads {first}..{first + n}, layer {layer}"
