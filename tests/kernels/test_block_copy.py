"""KV block gather/scatter: references against per-block indexing, Triton against the references, for the
engine's [2, N, B, Hk, D] layout and for odd block sizes that force narrower copy words."""

import pytest
import torch

from pdserve.kernels._common import interpreting
from pdserve.kernels.block_copy import (
    BlockCopier,
    copy_blocks,
    copy_blocks_ref,
    gather_blocks,
    gather_blocks_ref,
    scatter_blocks,
    scatter_blocks_ref,
)

LAYOUTS = {
    "kv-cache": (16, 3, 16),  # [B, Hk, D]
    "odd-bytes": (3, 5),  # 15 elements: int16 words in fp16, int32 in fp32
}


def _cache(blk, dtype, N=7, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((2, N, *blk), generator=gen).to(dtype).to(device)


def test_refs_match_indexing():
    cache = _cache((4, 3), torch.float32)
    ids = torch.tensor([5, 0, 3])
    buf = gather_blocks_ref(cache, ids)
    for i, b in enumerate(ids.tolist()):
        assert torch.equal(buf[:, i], cache[:, b])
    target = torch.zeros_like(cache)
    scatter_blocks_ref(buf, ids, target)
    for b in range(cache.shape[1]):
        assert torch.equal(target[:, b], cache[:, b] if b in ids.tolist() else torch.zeros_like(cache[:, b]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_triton_matches_ref(layout, dtype):
    cache = _cache(LAYOUTS[layout], dtype, seed=1)
    ids = torch.tensor([6, 2, 3, 0, 5])
    # gather into a fresh buffer and into a slice of a larger one (a per-layer message inside a coalesced
    # send)
    assert torch.equal(gather_blocks(cache, ids), gather_blocks_ref(cache, ids))
    big = torch.zeros((2, 9, *LAYOUTS[layout]), dtype=dtype)
    out = gather_blocks(cache, ids, out=big[:, 2:7])
    assert torch.equal(out, cache[:, ids]) and out.data_ptr() == big[:, 2:7].data_ptr()
    # scatter into a second cache
    src = _cache(LAYOUTS[layout], dtype, N=5, seed=2)
    want, got = torch.zeros_like(cache), torch.zeros_like(cache)
    scatter_blocks_ref(src, ids, want)
    scatter_blocks(src, ids, got)
    assert torch.equal(got, want)


def test_copy_ref_matches_indexing():
    src, dst = _cache((4, 3), torch.float32, N=7, seed=4), torch.zeros((2, 11, 4, 3))
    src_ids, dst_ids = torch.tensor([5, 0, 3]), torch.tensor([10, 2, 7])
    copy_blocks_ref(src, src_ids, dst, dst_ids)
    for s_blk, d_blk in zip(src_ids.tolist(), dst_ids.tolist(), strict=False):
        assert torch.equal(dst[:, d_blk], src[:, s_blk])
    untouched = [b for b in range(11) if b not in dst_ids.tolist()]
    assert not dst[:, untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_copy_triton_matches_ref(layout, dtype):
    # cache to cache of another size (a peer's cache has its own block count), both sides indexed
    src = _cache(LAYOUTS[layout], dtype, N=9, seed=5)
    src_ids, dst_ids = torch.tensor([8, 1, 4, 0]), torch.tensor([2, 12, 5, 9])
    want = _cache(LAYOUTS[layout], dtype, N=13, seed=6)
    got = want.clone()
    copy_blocks_ref(src, src_ids, want, dst_ids)
    copy_blocks(src, src_ids, got, dst_ids)
    assert torch.equal(got, want)


def test_copy_refuses_mismatched_blocks():
    with pytest.raises(ValueError, match="blocks differ"):
        copy_blocks(
            _cache((4, 3), torch.float32), torch.tensor([0]), _cache((4, 2), torch.float32), torch.tensor([0])
        )
    with pytest.raises(ValueError, match="ids"):
        copy_blocks(
            _cache((4, 3), torch.float32),
            torch.tensor([0, 1]),
            _cache((4, 3), torch.float32),
            torch.tensor([0]),
        )


def test_empty_block_list():
    cache = _cache((4, 3), torch.float16)
    ids = torch.zeros(0, dtype=torch.long)
    assert gather_blocks(cache, ids).shape == (2, 0, 4, 3)
    scatter_blocks(gather_blocks(cache, ids), ids, cache)


@pytest.mark.gpu
@pytest.mark.parametrize("blocks", [1, 128, 2048])
@pytest.mark.parametrize("blk", [(16, 8, 128), (16, 2, 64)], ids=["llama8b", "qwen0.5b"])
def test_triton_matches_ref_gpu(blk, blocks):
    cache = _cache(blk, torch.bfloat16, N=blocks + 64, seed=3, device="cuda")
    ids = torch.randperm(blocks + 64, device="cuda")[:blocks]
    assert torch.equal(gather_blocks(cache, ids), gather_blocks_ref(cache, ids))
    src = torch.randn((2, blocks, *blk), device="cuda").to(torch.bfloat16)
    want, got = cache.clone(), cache.clone()
    scatter_blocks_ref(src, ids, want)
    scatter_blocks(src, ids, got)
    assert torch.equal(got, want)
    dst = _cache(blk, torch.bfloat16, N=blocks + 17, seed=4, device="cuda")
    dst_ids = torch.randperm(blocks + 17, device="cuda")[:blocks]
    want, got = dst.clone(), dst.clone()
    copy_blocks_ref(cache, ids, want, dst_ids)
    copy_blocks(cache, ids, got, dst_ids)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_copier_every_launch_matches_ref(device):
    """BlockCopier's first launch goes through Triton's JIT, later ones (on CUDA) straight to the compiled
    kernel: n = 1 first (a kernel specialised on n == 1 would then copy one block only), then other n; on a
    side stream; and ids at an odd offset (not 16-byte aligned), which must take the JIT path and still copy
    right."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and not interpreting():
        pytest.skip("Triton on CPU tensors runs only in its interpreter (TRITON_INTERPRET=1)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    src = _cache((16, 2, 8), dtype, N=40, seed=6, device=device)
    dst = _cache((16, 2, 8), dtype, N=41, seed=7, device=device)
    want, copier = dst.clone(), BlockCopier(src, dst, block_words=32)  # several programs per block
    side = torch.cuda.Stream() if device == "cuda" else None
    gen = torch.Generator().manual_seed(8)
    for n, unaligned in ((1, False), (7, False), (16, False), (1, False), (33, False), (5, True)):
        pad = int(unaligned)
        src_ids = torch.randperm(40, generator=gen)[: n + pad].to(device)[pad:]
        dst_ids = torch.randperm(41, generator=gen)[: n + pad].to(device)[pad:]
        copy_blocks_ref(src, src_ids, want, dst_ids)
        if side is None:
            copier(src_ids, dst_ids)
        else:
            side.wait_stream(torch.cuda.current_stream())
            copier(src_ids, dst_ids, side.cuda_stream)
            torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(dst, want), f"n={n} unaligned={unaligned}"
    assert (copier.compiled is not None) == (device == "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "src_heads,src_at,dst_heads,dst_at,n,head_dim",
    [(3, 1, 4, 2, 2, 6), (1, 0, 2, 1, 1, 3), (4, 0, 2, 0, 2, 8), (2, 1, 2, 0, 1, 5)],
    ids=["3to4", "replicated-odd-dim", "4to2", "1-of-2-to-1-of-2"],
)
def test_head_slice_copy_matches_ref(src_heads, src_at, dst_heads, dst_at, n, head_dim, dtype):
    """A tensor-parallel rank's heads into a cache of other heads: blocks as token rows of a head slice, both
    sides indexed, odd block sizes and head dims (narrower words), several programs per block."""
    if not interpreting():
        pytest.skip("Triton on CPU tensors runs only in its interpreter (TRITON_INTERPRET=1)")
    src = _cache((5, src_heads, head_dim), dtype, N=9, seed=9).narrow(3, src_at, n)
    full = _cache((5, dst_heads, head_dim), dtype, N=11, seed=10)
    want = full.clone()
    src_ids, dst_ids = torch.tensor([8, 1, 4, 0, 6]), torch.tensor([2, 10, 5, 9, 0])
    copy_blocks_ref(src, src_ids, want.narrow(3, dst_at, n), dst_ids)
    copier = BlockCopier(src, full.narrow(3, dst_at, n), block_words=4)
    assert copier.rows == 5
    copier(src_ids, dst_ids)
    assert torch.equal(full, want)  # the other heads and blocks untouched


def test_head_slice_copy_refuses_other_strides():
    cache = _cache((4, 3, 2), torch.float32)
    with pytest.raises(ValueError, match="head slice"):
        BlockCopier(cache.narrow(4, 0, 1), cache.narrow(4, 1, 1))  # a slice of head_dim is no row


@pytest.mark.gpu
def test_head_slice_copy_matches_ref_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    src = _cache((16, 4, 128), torch.bfloat16, N=300, seed=11, device="cuda")
    dst = _cache((16, 8, 128), torch.bfloat16, N=310, seed=12, device="cuda")
    src_ids, dst_ids = torch.randperm(300, device="cuda")[:256], torch.randperm(310, device="cuda")[:256]
    for at in (0, 4):  # prefill TP 2 -> decode TP 1: each rank's four heads into the eight
        want = dst.clone()
        copy_blocks_ref(src, src_ids, want.narrow(3, at, 4), dst_ids)
        copier = BlockCopier(src, dst.narrow(3, at, 4), block_words=1024)
        for _ in range(2):  # the JIT launch, then the compiled one
            copier(src_ids, dst_ids)
        assert torch.equal(dst, want)
