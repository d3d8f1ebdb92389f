"""Paged decode attention: reference against dense attention, split-K Triton against the reference; with and
without a sliding window and a logit softcap."""

import pytest
import torch

from pdserve.kernels import decode_attention, dispatch
from pdserve.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from tests.kernels.paged import dense_causal_attention, make_paged, poison_before_window, tol

B = 16
CONTEXTS = {
    "mixed": [1, 17, 40],  # one key, one past a block, mid-block
    "many": [33, 5, 16, 64, 9],  # block-aligned and not
}


def _inputs(seq_lens, hq, hk, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dense_k, dense_v, k_cache, v_cache, tables = make_paged(seq_lens, hk, d, B, dtype, gen)
    qkv = torch.randn((len(seq_lens), hq + 2 * hk, d), generator=gen).to(dtype)
    return qkv[:, :hq], dense_k, dense_v, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(CONTEXTS))
def test_ref_matches_dense(case, dtype):
    q, dk, dv, kc, vc, tables, seq_lens = _inputs(CONTEXTS[case], 6, 3, 16, dtype, seed=1)
    out = paged_decode_attention_ref(q, kc, vc, tables, seq_lens, 0.3)
    for s in range(q.shape[0]):
        want = dense_causal_attention(q[s : s + 1], dk[s], dv[s], 0.3)
        torch.testing.assert_close(out[s : s + 1].float(), want, **tol(dtype))


@pytest.mark.parametrize("splits", [None, 2, 5], ids=["planned", "s2", "s5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(6, 3), (5, 1)])
@pytest.mark.parametrize("case", sorted(CONTEXTS))
def test_triton_matches_ref(case, heads, dtype, splits, monkeypatch):
    if (
        splits is not None
    ):  # force several split-K partitions (some idle at short contexts) so the reduce merges
        monkeypatch.setattr(decode_attention, "plan_splits", lambda *args: splits)
    d = 32 if heads == (5, 1) else 16
    q, _, _, kc, vc, tables, seq_lens = _inputs(CONTEXTS[case], *heads, d, dtype, seed=2)
    want = paged_decode_attention_ref(q, kc, vc, tables, seq_lens, d**-0.5)
    out = torch.full_like(want, float("nan"))
    got = paged_decode_attention(q, kc, vc, tables, seq_lens, d**-0.5, out=out)
    assert got is out
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("splits", [None, 3], ids=["planned", "s3"])
def test_empty_context_gives_zeros(splits, window, monkeypatch):
    """A padded batch slot (seq_len 0, as CUDA-graph buckets leave) yields zeros, not NaN, and disturbs no
    other."""
    if splits is not None:
        monkeypatch.setattr(decode_attention, "plan_splits", lambda *args: splits)
    q, _, _, kc, vc, tables, seq_lens = _inputs([5, 20, 33], 6, 3, 16, torch.float32, seed=4)
    seq_lens[1] = 0
    want = paged_decode_attention_ref(q, kc, vc, tables, seq_lens, 0.25, sliding_window=window)
    got = paged_decode_attention(q, kc, vc, tables, seq_lens, 0.25, sliding_window=window)
    assert torch.equal(want[1], torch.zeros_like(want[1]))
    torch.testing.assert_close(got, want, **tol(torch.float32))


# (context lengths, sliding_window, softcap, (Hq, Hk)). B is 16: windows of 13, 21 and 33 are no multiple of
# it (nor of the interpreter's 16-key tiles). The query sits at seq_len - 1 and sees keys from seq_len - W on.
WINDOW_CASES = {
    "window-lt-context": ([1, 17, 40, 70], 13, 0.0, (6, 3)),
    "window-eq-context": ([33, 5, 16], 33, 0.0, (5, 1)),
    "window-gt-context": ([33, 5, 16, 64, 9], 100, 0.0, (6, 3)),
    "window-1": ([1, 20, 37], 1, 0.0, (6, 2)),  # the query sees only its own key
    "softcap": ([33, 5, 16, 64, 9], 0, 2.0, (5, 1)),
    "window-and-softcap": ([3, 50, 81], 21, 1.5, (6, 2)),
}


def _window_inputs(case, dtype, seed):
    seq_lens, window, softcap, (hq, hk) = WINDOW_CASES[case]
    d = 32 if hq // hk > 2 else 16
    q, dk, dv, kc, vc, tables, lens = _inputs(seq_lens, hq, hk, d, dtype, seed)
    poisoned = poison_before_window(tables, kc, [n - 1 for n in seq_lens], window, B) if window else 0
    return q, dk, dv, kc, vc, tables, lens, dict(sliding_window=window, softcap=softcap), poisoned


def test_window_cases_poison_some_tables():
    """The tests below would prove nothing about unread blocks if no table entry were poisoned."""
    for case in ("window-lt-context", "window-1", "window-and-softcap"):
        assert _window_inputs(case, torch.float32, seed=0)[-1] > 0, case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_ref_matches_dense_with_options(case, dtype):
    q, dk, dv, kc, vc, tables, seq_lens, opts, _ = _window_inputs(case, dtype, seed=5)
    scale = q.shape[-1] ** -0.5
    out = paged_decode_attention_ref(q, kc, vc, tables, seq_lens, scale, **opts)
    for s in range(q.shape[0]):
        want = dense_causal_attention(q[s : s + 1], dk[s], dv[s], scale, **opts)
        torch.testing.assert_close(out[s : s + 1].float(), want, **tol(dtype))


@pytest.mark.parametrize("splits", [None, 3], ids=["planned", "s3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", sorted(WINDOW_CASES))
def test_triton_matches_ref_with_options(case, dtype, splits, monkeypatch):
    if splits is not None:
        monkeypatch.setattr(decode_attention, "plan_splits", lambda *args: splits)
    q, _, _, kc, vc, tables, seq_lens, opts, _ = _window_inputs(case, dtype, seed=6)
    scale = q.shape[-1] ** -0.5
    want = paged_decode_attention_ref(q, kc, vc, tables, seq_lens, scale, **opts)
    out = torch.full_like(want, float("nan"))
    got = paged_decode_attention(q, kc, vc, tables, seq_lens, scale, out=out, **opts)
    assert got is out and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **tol(dtype))


def test_window_bounds_the_planned_splits(monkeypatch):
    """Split-K plans for the keys a query can see: a window narrower than the block table caps the context the
    partitions share out, so a long context costs only the window."""
    seen = []

    def plan(num_seqs, num_kv_heads, max_context, block_n, device):
        seen.append(max_context)
        return 2

    monkeypatch.setattr(decode_attention, "plan_splits", plan)
    q, _, _, kc, vc, tables, seq_lens = _inputs([1, 17, 40, 70], 6, 3, 16, torch.float32, seed=7)
    for window in (13, 0):
        paged_decode_attention(q, kc, vc, tables, seq_lens, 0.25, sliding_window=window)
    assert seen == [13, tables.shape[1] * B]


@pytest.mark.parametrize("mode", ["ref", "triton"])
def test_dispatch_passes_options(mode, monkeypatch):
    monkeypatch.setenv("PDSERVE_KERNELS", mode)
    q, _, _, kc, vc, tables, seq_lens, opts, _ = _window_inputs("window-and-softcap", torch.float32, seed=8)
    got = dispatch.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.3, **opts)
    want = paged_decode_attention_ref(q, kc, vc, tables, seq_lens, 0.3, **opts)
    torch.testing.assert_close(got, want, **tol(torch.float32))


@pytest.mark.parametrize("opts", [dict(sliding_window=-1), dict(softcap=-1.0), dict(softcap=float("nan"))])
def test_bad_options_are_clear_errors(opts):
    q, _, _, kc, vc, tables, seq_lens = _inputs([3, 9], 2, 1, 16, torch.float32, seed=9)
    for fn in (paged_decode_attention, paged_decode_attention_ref):
        with pytest.raises(ValueError, match=next(iter(opts))):
            fn(q, kc, vc, tables, seq_lens, 0.25, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("context", [512, 2048])
@pytest.mark.parametrize("heads", [(32, 8, 128), (14, 2, 64)], ids=["llama8b", "qwen0.5b"])
def test_triton_matches_ref_gpu(heads, context, batch):
    hq, hk, d = heads
    gen = torch.Generator().manual_seed(3)
    seq_lens = [context - (7 * s) % 61 for s in range(batch)]  # ragged, mostly not block-aligned
    _, _, kc, vc, tables = make_paged(seq_lens, hk, d, 16, torch.bfloat16, gen, device="cuda")
    q = torch.randn((batch, hq, d), generator=gen).to(torch.bfloat16).cuda()
    sl = torch.tensor(seq_lens, dtype=torch.int32).cuda()
    want = paged_decode_attention_ref(q, kc, vc, tables, sl, d**-0.5)
    got = paged_decode_attention(q, kc, vc, tables, sl, d**-0.5)
    torch.testing.assert_close(got, want, **tol(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "opts",
    [dict(sliding_window=700), dict(softcap=10.0), dict(sliding_window=1000, softcap=20.0)],
    ids=["window", "softcap", "both"],
)
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("heads", [(32, 8, 128), (16, 8, 256)], ids=["llama8b", "gemma2-9b"])
def test_triton_with_options_gpu(heads, batch, opts):
    hq, hk, d = heads
    gen = torch.Generator().manual_seed(5)
    seq_lens = [(3000 + 977 * s) % 4096 + 1 for s in range(batch)]  # ragged, some within the window
    _, _, kc, vc, tables = make_paged(seq_lens, hk, d, 16, torch.bfloat16, gen, device="cuda")
    if opts.get("sliding_window"):
        assert poison_before_window(tables, kc, [n - 1 for n in seq_lens], opts["sliding_window"], 16) > 0
    q = torch.randn((batch, hq, d), generator=gen).to(torch.bfloat16).cuda()
    sl = torch.tensor(seq_lens, dtype=torch.int32).cuda()
    scale = 4 * d**-0.5  # scores of a few units, so that a cap of 10 or 20 bends them
    want = paged_decode_attention_ref(q, kc, vc, tables, sl, scale, **opts)
    got = paged_decode_attention(q, kc, vc, tables, sl, scale, **opts)
    torch.testing.assert_close(got, want, **tol(torch.bfloat16))
