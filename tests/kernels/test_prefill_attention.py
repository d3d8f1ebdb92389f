"""Chunked-prefill paged attention: reference against dense causal attention, Triton against the reference;
with and without a sliding window and a logit softcap."""

import pytest
import torch

from pdserve.kernels import dispatch
from pdserve.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from tests.kernels.paged import dense_causal_attention, make_paged, poison_before_window, tol

B = 16
# (query lengths, cached prefix lengths) per sequence: q_len 1 and > 1, prefixes off and on block boundaries.
CASES = {
    "mixed": ([1, 7, 19], [0, 13, 21]),
    "one-seq-aligned-prefix": ([5], [32]),
    "many": ([1, 1, 3, 17, 2], [30, 0, 5, 1, 47]),
}


def _inputs(q_lens, prefixes, hq, hk, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefixes, q_lens, strict=False)]
    dense_k, dense_v, k_cache, v_cache, tables = make_paged(seq_lens, hk, d, B, dtype, gen)
    T = sum(q_lens)
    # q is a strided view, as a slice of a fused qkv projection would be.
    qkv = torch.randn((T, hq + 2 * hk, d), generator=gen).to(dtype)
    q = qkv[:, :hq]
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, dense_k, dense_v, k_cache, v_cache, tables, cu, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ref_matches_dense(case, dtype):
    q_lens, prefixes = CASES[case]
    q, dk, dv, kc, vc, tables, cu, seq_lens = _inputs(q_lens, prefixes, 6, 3, 16, dtype, seed=1)
    out = paged_prefill_attention_ref(q, kc, vc, tables, cu, seq_lens, 0.25)
    for s in range(len(q_lens)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        want = dense_causal_attention(q[rows], dk[s], dv[s], 0.25)
        torch.testing.assert_close(out[rows].float(), want, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(6, 3), (5, 1)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_ref(case, heads, dtype):
    q_lens, prefixes = CASES[case]
    d = 32 if heads == (5, 1) else 16
    q, _, _, kc, vc, tables, cu, seq_lens = _inputs(q_lens, prefixes, *heads, d, dtype, seed=2)
    want = paged_prefill_attention_ref(q, kc, vc, tables, cu, seq_lens, d**-0.5)
    out = torch.full_like(want, float("nan"))
    got = paged_prefill_attention(q, kc, vc, tables, cu, seq_lens, d**-0.5, out=out)
    assert got is out
    torch.testing.assert_close(got, want, **tol(dtype))


# (query lengths, cached prefix lengths, sliding_window, softcap, (Hq, Hk)). B is 16, so a window of 13, 21 or
# 35 is no multiple of the block (nor of the interpreter's 16-key tiles); "chunk-after-window" has chunks that
# start past their window's start, so the blocks before it are poisoned below.
WINDOW_CASES = {
    "window-lt-context": ([1, 7, 19], [0, 13, 40], 13, 0.0, (6, 3)),
    "window-eq-context": ([9, 1], [24, 32], 33, 0.0, (5, 1)),  # the first sees all 33 keys, the second 32
    "window-gt-context": ([5, 17], [30, 3], 100, 0.0, (6, 3)),
    "window-1": ([3, 18], [21, 0], 1, 0.0, (6, 2)),  # each query sees only itself
    "chunk-after-window": ([1, 1, 3, 17, 2], [30, 0, 5, 1, 47], 21, 0.0, (5, 1)),
    "softcap": ([1, 7, 19], [0, 13, 21], 0, 2.0, (6, 3)),
    "window-and-softcap": ([6, 23, 2], [50, 9, 66], 35, 1.5, (6, 2)),
}


def _window_inputs(case, dtype, seed):
    q_lens, prefixes, window, softcap, (hq, hk) = WINDOW_CASES[case]
    d = 32 if hq // hk > 2 else 16
    q, dk, dv, kc, vc, tables, cu, seq_lens = _inputs(q_lens, prefixes, hq, hk, d, dtype, seed)
    poisoned = poison_before_window(tables, kc, prefixes, window, B) if window else 0
    return q, dk, dv, kc, vc, tables, cu, seq_lens, dict(sliding_window=window, softcap=softcap), poisoned


def test_window_cases_poison_some_tables():
    """The Triton and reference tests below would prove nothing about unread blocks if none were poisoned."""
    for case in ("window-lt-context", "chunk-after-window", "window-and-softcap", "window-1"):
        assert _window_inputs(case, torch.float32, seed=0)[-1] > 0, case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_ref_matches_dense_with_options(case, dtype):
    q, dk, dv, kc, vc, tables, cu, seq_lens, opts, _ = _window_inputs(case, dtype, seed=5)
    scale = q.shape[-1] ** -0.5
    out = paged_prefill_attention_ref(q, kc, vc, tables, cu, seq_lens, scale, **opts)
    for s in range(len(dk)):
        rows = slice(int(cu[s]), int(cu[s + 1]))
        want = dense_causal_attention(q[rows], dk[s], dv[s], scale, **opts)
        torch.testing.assert_close(out[rows].float(), want, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_triton_matches_ref_with_options(case, dtype):
    q, _, _, kc, vc, tables, cu, seq_lens, opts, _ = _window_inputs(case, dtype, seed=6)
    scale = q.shape[-1] ** -0.5
    want = paged_prefill_attention_ref(q, kc, vc, tables, cu, seq_lens, scale, **opts)
    out = torch.full_like(want, float("nan"))
    got = paged_prefill_attention(q, kc, vc, tables, cu, seq_lens, scale, out=out, **opts)
    assert got is out and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("mode", ["ref", "triton"])
def test_dispatch_passes_options(mode, monkeypatch):
    monkeypatch.setenv("PDSERVE_KERNELS", mode)
    q, dk, dv, kc, vc, tables, cu, seq_lens, opts, _ = _window_inputs("window-and-softcap", torch.float32, 7)
    got = dispatch.paged_prefill_attention(q, kc, vc, tables, cu, seq_lens, 0.3, **opts)
    want = paged_prefill_attention_ref(q, kc, vc, tables, cu, seq_lens, 0.3, **opts)
    torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("opts", [dict(sliding_window=-1), dict(softcap=-1.0), dict(softcap=float("inf"))])
def test_bad_options_are_clear_errors(opts):
    q, _, _, kc, vc, tables, cu, seq_lens = _inputs([3], [4], 2, 1, 16, torch.float32, seed=8)
    for fn in (paged_prefill_attention, paged_prefill_attention_ref):
        with pytest.raises(ValueError, match=next(iter(opts))):
            fn(q, kc, vc, tables, cu, seq_lens, 0.25, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("context", [512, 2048])
@pytest.mark.parametrize("heads", [(32, 8, 128), (14, 2, 64)], ids=["llama8b", "qwen0.5b"])
def test_triton_matches_ref_gpu(heads, context, batch):
    hq, hk, d = heads
    gen = torch.Generator().manual_seed(3)
    # Half the sequences prefill from scratch, half run a chunk over a cached prefix that ends mid-block.
    q_lens = [context if s % 2 == 0 else 300 + s for s in range(batch)]
    prefixes = [0 if s % 2 == 0 else context - 300 - s - 5 for s in range(batch)]
    if sum(q_lens) > 16384:  # keep T realistic for one step's token budget
        q_lens = [max(1, n * 16384 // sum(q_lens)) for n in q_lens]
    seq_lens = [p + n for p, n in zip(prefixes, q_lens, strict=False)]
    _, _, kc, vc, tables = make_paged(seq_lens, hk, d, 16, torch.bfloat16, gen, device="cuda")
    q = torch.randn((sum(q_lens), hq, d), generator=gen).to(torch.bfloat16).cuda()
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    sl = torch.tensor(seq_lens, dtype=torch.int32).cuda()
    want = paged_prefill_attention_ref(q, kc, vc, tables, cu, sl, d**-0.5)
    got = paged_prefill_attention(q, kc, vc, tables, cu, sl, d**-0.5)
    torch.testing.assert_close(got, want, **tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts",
    [dict(sliding_window=700), dict(softcap=10.0), dict(sliding_window=1000, softcap=20.0)],
    ids=["window", "softcap", "both"],
)
@pytest.mark.parametrize("heads", [(32, 8, 128), (16, 8, 256)], ids=["llama8b", "gemma2-9b"])
def test_triton_with_options_gpu(heads, opts):
    hq, hk, d = heads
    gen = torch.Generator().manual_seed(4)
    # A chunk far past its window's start, a prompt from scratch longer than the window, and a short chunk.
    q_lens, prefixes = [517, 2048, 33], [3000, 0, 100]
    seq_lens = [p + n for p, n in zip(prefixes, q_lens, strict=False)]
    _, _, kc, vc, tables = make_paged(seq_lens, hk, d, 16, torch.bfloat16, gen, device="cuda")
    if opts.get("sliding_window"):
        assert poison_before_window(tables, kc, prefixes, opts["sliding_window"], 16) > 0
    q = torch.randn((sum(q_lens), hq, d), generator=gen).to(torch.bfloat16).cuda()
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    sl = torch.tensor(seq_lens, dtype=torch.int32).cuda()
    scale = 4 * d**-0.5  # scores of a few units, so that a cap of 10 or 20 bends them
    want = paged_prefill_attention_ref(q, kc, vc, tables, cu, sl, scale, **opts)
    got = paged_prefill_attention(q, kc, vc, tables, cu, sl, scale, **opts)
    torch.testing.assert_close(got, want, **tol(torch.bfloat16))
