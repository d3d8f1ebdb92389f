"""Paged decode attention: reference against dense attention, split-K Triton against the reference."""

import pytest
import torch

from pdserve.kernels import decode_attention
from pdserve.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from tests.kernels.paged import dense_causal_attention, make_paged, tol

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


@pytest.mark.parametrize("splits", [None, 3], ids=["planned", "s3"])
def test_empty_context_gives_zeros(splits, monkeypatch):
    """A padded batch slot (seq_len 0, as CUDA-graph buckets leave) yields zeros, not NaN, and disturbs no
    other."""
    if splits is not None:
        monkeypatch.setattr(decode_attention, "plan_splits", lambda *args: splits)
    q, _, _, kc, vc, tables, seq_lens = _inputs([5, 20, 33], 6, 3, 16, torch.float32, seed=4)
    seq_lens[1] = 0
    want = paged_decode_attention_ref(q, kc, vc, tables, seq_lens, 0.25)
    got = paged_decode_attention(q, kc, vc, tables, seq_lens, 0.25)
    assert torch.equal(want[1], torch.zeros_like(want[1]))
    torch.testing.assert_close(got, want, **tol(torch.float32))


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
