"""The nixl plane's descriptor math (numpy only, no NIXL needed): block ids become runs where both sides are
consecutive, and runs become one K and one V descriptor each, whose bytes cover exactly the blocks listed."""

import numpy as np
import pytest

from pdserve.kvconnector.transport.nixl_routes import block_runs, run_descriptors


def test_runs_break_where_either_side_jumps():
    src = np.array([4, 5, 6, 9, 10, 11, 3])
    dst = np.array([7, 8, 9, 2, 3, 5, 6])
    s, d, n = block_runs(src, dst)
    assert s.tolist() == [4, 9, 11, 3] and d.tolist() == [7, 2, 5, 6] and n.tolist() == [3, 2, 1, 1]
    empty = block_runs(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert all(a.size == 0 for a in empty)


@pytest.mark.parametrize("seed", range(5))
def test_descriptors_cover_exactly_the_blocks(seed):
    rng = np.random.default_rng(seed)
    num_blocks, block_bytes, base = 50, 96, 1 << 20
    part = num_blocks * block_bytes
    n = int(rng.integers(1, 30))
    src = rng.permutation(num_blocks)[:n]
    src[: n // 2] = np.sort(src[: n // 2])  # some runs, some scatter
    dst = rng.permutation(num_blocks)[:n]
    dst[: n // 2] = np.sort(dst[: n // 2])
    s, d, lengths = block_runs(src, dst)
    assert lengths.sum() == n
    descs = run_descriptors(base, part, block_bytes, s, lengths, device_id=3)
    assert descs.shape == (2 * len(s), 3) and set(descs[:, 2].tolist()) == {3}
    assert _covered(descs, block_bytes) == {base + p * part + b * block_bytes for p in (0, 1) for b in src}
    # the destination side pairs run for run: same sizes, in the same order, covering the destination blocks
    dd = run_descriptors(7 << 20, part, block_bytes, d, lengths, device_id=0)
    assert dd[:, 1].tolist() == descs[:, 1].tolist()
    assert _covered(dd, block_bytes) == {(7 << 20) + p * part + b * block_bytes for p in (0, 1) for b in dst}


def _covered(descs, block_bytes) -> set:
    covered = set()
    for addr, size, _ in descs.tolist():
        assert size % block_bytes == 0
        covered |= set(range(addr, addr + size, block_bytes))
    return covered
