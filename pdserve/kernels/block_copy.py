"""Copy whole KV blocks: between the paged cache and one contiguous buffer, or from one cache into another.

    gather_blocks(cache [P, N, *blk], block_ids [n]) -> out [P, n, *blk]    out[p, i] = cache[p, block_ids[i]]
    scatter_blocks(src [P, n, *blk], block_ids [n], cache [P, N, *blk])      cache[p, block_ids[i]] = src[p,
    i]
    copy_blocks(src [P, N, *blk], src_ids [n], dst [P, M, *blk], dst_ids [n])  dst[p, dst_ids[i]] = src[p,
    src_ids[i]]

copy_blocks is the one-sided KV write: dst may be a peer process's cache mapped into this one (CUDA IPC), so
one launch moves a layer's blocks straight into the blocks the peer reserved, with no staging buffer on either
side.

The engine's per-layer cache is [2, N, B, Hk, D] (P = 2: K then V). A block is copied as a flat run of bytes,
reinterpreted as the widest integer word its size and alignment allow, so the copy is dtype-blind and
vectorised. copy_blocks (BlockCopier) also takes head slices of caches ([2, N, B, Hk, D] narrowed along Hk):
a tensor-parallel rank's heads into or out of a cache holding more heads. A block is then B rows of the
slice's contiguous h * D elements, and a program copies a tile of rows.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from pdserve.kernels._common import check, check_same_device, interpreting

_WORDS = (torch.int64, torch.int32, torch.int16, torch.uint8)


# n (the number of blocks) changes every call: never specialise on it, so one compiled kernel serves every n
# and BlockCopier can launch that compiled kernel directly.
@triton.jit(do_not_specialize=["n"])
def _copy_blocks_kernel(
    src_ptr,  # gather: cache [P, N, R, W]; scatter: buffer [P, n, R, W]
    dst_ptr,  # gather: buffer [P, n, R, W]; scatter: cache [P, N, R, W]
    src_ids_ptr,  # [n] block ids into src (read only when SRC_INDEXED)
    dst_ids_ptr,  # [n] block ids into dst (read only when DST_INDEXED)
    stride_sp,
    stride_sn,
    stride_sr,
    stride_dp,
    stride_dn,
    stride_dr,  # strides of the P, block and row dims, in words
    n,
    rows,
    words_per_row,
    SRC_INDEXED: tl.constexpr,
    DST_INDEXED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    p = (pid // n).to(tl.int64)
    i = (pid % n).to(tl.int64)
    s_blk = i
    d_blk = i
    if SRC_INDEXED:
        s_blk = tl.load(src_ids_ptr + i).to(tl.int64)
    if DST_INDEXED:
        d_blk = tl.load(dst_ids_ptr + i).to(tl.int64)
    src = src_ptr + p * stride_sp + s_blk * stride_sn
    dst = dst_ptr + p * stride_dp + d_blk * stride_dn
    chunks = tl.cdiv(words_per_row, BLOCK)  # programs along a row
    tile = tl.program_id(1).to(tl.int64)
    r = (tile // chunks) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    w = (tile % chunks) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (r < rows) & (w < words_per_row)
    tl.store(dst + r * stride_dr + w, tl.load(src + r * stride_sr + w, mask=mask), mask=mask)


def _rows(t: torch.Tensor, token_rows: bool) -> torch.Tensor:
    """[P, N, *blk] -> a [P, N, R, W] view: each block as R rows of W contiguous elements. A contiguous block
    is one row; with token_rows, a cache view [P, N, B, h, D] narrowed along h (a tensor-parallel rank's
    share of another's heads) is B rows of h * D elements, one per token slot."""
    if not token_rows:
        return t.flatten(2).unsqueeze(2)
    check(
        t.dim() == 5 and t.stride(4) == 1 and t.stride(3) == t.shape[4],
        f"each block must be contiguous or a head slice of [B, H, D] blocks, got strides {t.stride()}",
    )
    return t.flatten(3)


def _words(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [P, n, *blk] -> [P, n, R, W] row views (_rows: token rows when either side is a head slice) in
    the widest integer word the row size, strides and offsets of both allow (int64 for any real KV block)."""
    token_rows = any(t.shape[1] and not t[0, 0].is_contiguous() for t in (a, b))
    ra, rb = _rows(a, token_rows), _rows(b, token_rows)
    for word in _WORDS:
        fits = all(
            x * a.element_size() % word.itemsize == 0
            for r in (ra, rb)
            for x in (r.shape[-1], r.storage_offset(), *_strides_that_move(r))
        )
        if fits:
            return ra.view(word), rb.view(word)
    raise AssertionError("unreachable: bytes always fit")


def _strides_that_move(r: torch.Tensor) -> list[int]:
    """The P, block and row strides of dims longer than one (a stride of a length-1 dim is never used)."""
    return [stride for stride, size in zip(r.stride()[:3], r.shape[:3], strict=True) if size > 1]


def _tiles(rows: int, words: int, cap: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK, programs per block): a program copies BLOCK_R rows of BLOCK words, about `cap`
    words."""
    block = min(triton.next_power_of_2(max(words, 1)), cap)
    block_r = 1 if rows == 1 else max(1, min(triton.next_power_of_2(rows), cap // block))
    return block_r, block, triton.cdiv(rows, block_r) * triton.cdiv(words, block)


def _check_blocks(cache: torch.Tensor, buf: torch.Tensor, block_ids: torch.Tensor) -> None:
    check(cache.dim() >= 3, f"cache: expected [P, N, *blk], got {tuple(cache.shape)}")
    check(
        buf.shape[0] == cache.shape[0] and buf.shape[2:] == cache.shape[2:], "buffer and cache blocks differ"
    )
    check(
        buf.shape[1] == block_ids.shape[0],
        f"buffer holds {buf.shape[1]} blocks, {block_ids.shape[0]} ids given",
    )
    check(buf.dtype == cache.dtype, f"dtype: buffer {buf.dtype}, cache {cache.dtype}")
    check(
        block_ids.dim() == 1 and block_ids.dtype in (torch.int64, torch.int32) and block_ids.is_contiguous(),
        "block_ids: expected a contiguous [n] int64 tensor",
    )
    for name, t in (("cache", cache), ("buffer", buf)):
        check(t[0, 0].is_contiguous() if t.shape[1] else True, f"{name}: each block must be contiguous")
    check_same_device(cache, buf, block_ids)


def _launch(src: torch.Tensor, dst: torch.Tensor, src_ids, dst_ids) -> None:
    """src_ids / dst_ids: [n] block ids, or None where that side is the contiguous buffer (block i)."""
    P = src.shape[0]
    n = (src_ids if src_ids is not None else dst_ids).shape[0]
    if n == 0 or P == 0 or src[0, 0].numel() == 0:
        return
    src_w, dst_w = _words(src, dst)
    rows, words = src_w.shape[2], src_w.shape[3]
    block_r, block, tiles = _tiles(rows, words, 1024 if interpreting() else 4096)
    ids = src_ids if src_ids is not None else dst_ids
    _copy_blocks_kernel[(P * n, tiles)](
        src_w,
        dst_w,
        src_ids if src_ids is not None else ids,
        dst_ids if dst_ids is not None else ids,
        *src_w.stride()[:3],
        *dst_w.stride()[:3],
        n,
        rows,
        words,
        SRC_INDEXED=src_ids is not None,
        DST_INDEXED=dst_ids is not None,
        BLOCK_R=block_r,
        BLOCK=block,
        num_warps=1 if interpreting() else 8,
    )


def gather_blocks(
    cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """cache [P, N, *blk], block_ids [n] -> out [P, n, *blk] (allocated when not given)."""
    if out is None:
        shape = (cache.shape[0], block_ids.shape[0], *cache.shape[2:])
        out = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    _check_blocks(cache, out, block_ids)
    _launch(cache, out, block_ids, None)
    return out


def scatter_blocks(src: torch.Tensor, block_ids: torch.Tensor, cache: torch.Tensor) -> None:
    """src [P, n, *blk] -> cache[:, block_ids] ([P, N, *blk]), in place."""
    _check_blocks(cache, src, block_ids)
    _launch(src, cache, None, block_ids)


def copy_blocks(src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor) -> None:
    """dst[:, dst_ids[i]] = src[:, src_ids[i]] for both caches [P, *, *blk]; dst may be a peer's mapped
    cache."""
    BlockCopier(src, dst)(src_ids, dst_ids)


class BlockCopier:
    """copy_blocks for one fixed (src, dst) pair, checked and viewed as words once. The KV connector calls it
    once per layer on the forward thread, so a call must cost little host time: after the first launch
    (through Triton's JIT, which compiles and binds the arguments), calls launch the compiled kernel directly
    on the given stream, skipping the JIT's argument binding and cache lookup (tens of microseconds of Python
    per launch).

    src and dst may also be head slices of caches ([P, N, B, h, D] narrowed along h, as `Tensor.narrow`
    gives): a tensor-parallel rank's heads copied into, or out of, a cache holding other heads too. Each
    block is then B rows (token slots) of h * D elements.

    The compiled kernel is specialised on everything but n: the tensors, strides and word count are fixed per
    copier, and the id tensors' 16-byte alignment is checked per call (an unaligned pair takes the JIT
    path)."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, block_words: int | None = None):
        """block_words: words one program copies (a power of two; default a whole block up to 4096): smaller
        puts more programs, so more stores, in flight at once."""
        check(
            block_words is None or (block_words > 0 and block_words & (block_words - 1) == 0),
            f"block_words must be a power of two, got {block_words}",
        )
        check(
            src.dim() >= 3
            and src.shape[0] == dst.shape[0]
            and src.shape[2:] == dst.shape[2:]
            and src.dtype == dst.dtype,
            f"blocks differ: source {tuple(src.shape)} {src.dtype}, destination {tuple(dst.shape)} "
            f"{dst.dtype}",
        )
        check_same_device(src, dst)
        self.src_w, self.dst_w = _words(src, dst)  # checks each block is contiguous or a head slice
        check(
            self.src_w.shape[2:] == self.dst_w.shape[2:],
            f"blocks differ: source rows {tuple(self.src_w.shape[2:])}, "
            f"destination {tuple(self.dst_w.shape[2:])}",
        )
        self.rows, self.words = self.src_w.shape[2], self.src_w.shape[3]
        cap = 1024 if interpreting() else (block_words or 4096)
        self.block_r, self.block, self.tiles = _tiles(self.rows, self.words, cap)
        self.strides = (*self.src_w.stride()[:3], *self.dst_w.stride()[:3])
        self.grid_p = src.shape[0]
        self.num_warps = 1 if interpreting() else 8
        self.empty = src.shape[0] == 0 or self.words == 0
        self.compiled = None  # the kernel the first aligned JIT launch compiled, launched directly after it

    def __call__(self, src_ids: torch.Tensor, dst_ids: torch.Tensor, stream: int | None = None) -> None:
        """stream: a raw CUDA stream handle (torch.cuda.Stream.cuda_stream) to launch on; None: the current
        one."""
        n = src_ids.shape[0]
        check(dst_ids.shape[0] == n, f"{n} source ids, {dst_ids.shape[0]} destination ids")
        if n == 0 or self.empty:
            return
        grid = (self.grid_p * n, self.tiles, 1)
        args = (self.src_w, self.dst_w, src_ids, dst_ids, *self.strides, n, self.rows, self.words)
        aligned = not (src_ids.data_ptr() | dst_ids.data_ptr()) & 15
        if self.compiled is not None and aligned:
            self.compiled[grid](*args, True, True, self.block_r, self.block, stream=stream)
            return
        with _on_stream(stream, self.src_w.device):
            kernel = _copy_blocks_kernel[grid](
                *args,
                SRC_INDEXED=True,
                DST_INDEXED=True,
                BLOCK_R=self.block_r,
                BLOCK=self.block,
                num_warps=self.num_warps,
            )
        if aligned and not interpreting() and hasattr(kernel, "__getitem__"):
            self.compiled = kernel


def _on_stream(stream: int | None, device: torch.device):
    """A context that makes the raw stream handle current (a no-op for None or off CUDA)."""
    if stream is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device))


def gather_blocks_ref(
    cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-torch reference; same signature and results as `gather_blocks`."""
    picked = cache.index_select(1, block_ids.long())
    if out is None:
        return picked
    out.copy_(picked)
    return out


def scatter_blocks_ref(src: torch.Tensor, block_ids: torch.Tensor, cache: torch.Tensor) -> None:
    """Plain-torch reference; same signature and effect as `scatter_blocks`."""
    cache.index_copy_(1, block_ids.long(), src)


def copy_blocks_ref(
    src: torch.Tensor, src_ids: torch.Tensor, dst: torch.Tensor, dst_ids: torch.Tensor
) -> None:
    """Plain-torch reference; same signature and effect as `copy_blocks`."""
    dst.index_copy_(1, dst_ids.long(), src.index_select(1, src_ids.long()))
