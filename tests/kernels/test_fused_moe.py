"""Fused MoE: the reference against a dense computation (every expert for every token, masked by the routing),
Triton against the reference, the expert sort's bookkeeping, select_experts by hand, and dispatch."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pdserve.kernels.dispatch as dispatch
from pdserve.kernels import fused_moe as fm
from pdserve.kernels.fused_moe import fused_moe, fused_moe_ref, select_experts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# fp32: IEEE dots on both sides, only the order of the sums differs. fp16: both round the activation to fp16
# before the down projection; the reference also rounds gate_up, the kernel each slot's output: a few ulps.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _weights(E, H, inter, dtype, gen, device="cpu"):
    """w13 [E, 2I, H] and w2 [E, H, I] with padded rows (strided like a slice of a bigger tensor), scaled so
    every intermediate value stays O(1)."""
    w13 = torch.randn((E, 2 * inter, H + 3), generator=gen)[:, :, :H] / H**0.5
    w2 = torch.randn((E, H, inter + 5), generator=gen)[:, :, :inter] / inter**0.5
    return w13.to(dtype).to(device), w2.to(dtype).to(device)


def _case(T, E, K, H, inter, dtype, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn((T, H + 7), generator=gen)[:, :H].to(dtype).to(device)  # strided rows
    w13, w2 = _weights(E, H, inter, dtype, gen, device)
    weights, ids = select_experts(torch.randn((T, E), generator=gen).to(device), K, renormalize=True)
    return hidden, w13, w2, weights, ids


def dense_moe(hidden, w13, w2, topk_weights, topk_ids):
    """Every expert on every token in float64, then combined through a [T, E] matrix of routing weights (zero
    where an expert was not picked)."""
    x, w13, w2 = hidden.double(), w13.double(), w2.double()
    inter = w2.shape[2]
    gate_up = torch.einsum("th,enh->etn", x, w13)  # [E, T, 2I]
    y = torch.einsum("eti,ehi->eth", F.silu(gate_up[..., :inter]) * gate_up[..., inter:], w2)
    onehot = F.one_hot(topk_ids.long(), w13.shape[0]).double()  # [T, K, E]
    combine = (onehot * topk_weights.double()[..., None]).sum(1)  # [T, E]
    return torch.einsum("te,eth->th", combine, y)


@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (3, 4, 1), (37, 8, 2), (37, 4, 2)])
def test_ref_matches_dense(T, E, K):
    args = _case(T, E, K, 48, 40, torch.float32, seed=T * 10 + E)
    torch.testing.assert_close(fused_moe_ref(*args), dense_moe(*args).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "T,E,K,H,inter",
    [
        (1, 8, 2, 48, 40),  # 6 of 8 experts idle
        (3, 8, 1, 48, 40),
        (37, 8, 2, 48, 40),
        (37, 4, 2, 40, 24),  # ~18 rows an expert: more than one tile each
        (5, 4, 2, 16, 16),
    ],
)
def test_triton_matches_ref(T, E, K, H, inter, dtype):
    args = _case(T, E, K, H, inter, dtype, seed=T * 100 + E * 10 + K)
    want = fused_moe_ref(*args)
    torch.testing.assert_close(fused_moe(*args), want, **TOL[dtype])
    if dtype == torch.float32:
        torch.testing.assert_close(fused_moe(*args), dense_moe(*args).float(), **TOL[dtype])


def test_idle_experts_and_int64_ids_and_out():
    """Experts 0 and 2 of 6 get no pairs; int64 ids; a strided `out` is written in place and returned."""
    hidden, w13, w2, _, _ = _case(11, 6, 2, 48, 40, torch.float32, seed=5)
    gen = torch.Generator().manual_seed(6)
    busy = torch.tensor([1, 3, 4, 5])
    ids = busy[torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(11)])]  # distinct per row
    weights = torch.rand((11, 2), generator=gen)
    out = torch.full((11, 60), float("nan"))[:, :48]
    got = fused_moe(hidden, w13, w2, weights, ids, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert set(ids.flatten().tolist()) == {1, 3, 4, 5}
    torch.testing.assert_close(out, fused_moe_ref(hidden, w13, w2, weights, ids), **TOL[torch.float32])


@pytest.mark.parametrize("K", [1, 2])
def test_all_tokens_to_one_expert(K):
    """37 tokens on the last expert (three tiles of it, the last one padded); with K=2 slot 1 goes to
    expert 0."""
    hidden, w13, w2, _, _ = _case(37, 8, 1, 48, 40, torch.float32, seed=7)
    ids = torch.tensor([[7, 0][:K]] * 37, dtype=torch.int32)
    weights = torch.rand((37, K), generator=torch.Generator().manual_seed(8))
    want = fused_moe_ref(hidden, w13, w2, weights, ids)
    torch.testing.assert_close(want, dense_moe(hidden, w13, w2, weights, ids).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_moe(hidden, w13, w2, weights, ids), want, **TOL[torch.float32])


@pytest.mark.parametrize("T,E,K,block_m", [(1, 8, 2, 16), (37, 4, 2, 16), (37, 8, 1, 4), (5, 128, 8, 16)])
def test_sort_by_expert_bookkeeping(T, E, K, block_m):
    """Every pair sits in exactly one row, in a tile of its own expert; padding rows hold T*K; tiles past the
    used ones are marked spare (E), and the shape-only bound was enough."""
    ids = torch.randint(0, E, (T, K), generator=torch.Generator().manual_seed(T + E))
    tiles = fm.max_tiles(T * K, E, block_m)
    row_pair, tile_expert = fm.sort_by_expert(ids, E, block_m, tiles)
    flat = ids.flatten()
    real = row_pair < T * K
    assert sorted(row_pair[real].tolist()) == list(range(T * K))
    row_expert = tile_expert.repeat_interleave(block_m)
    assert torch.equal(row_expert[real].long(), flat[row_pair[real]].long())
    need = sum(-(-int((flat == e).sum()) // block_m) for e in range(E))
    assert need <= tiles
    assert (tile_expert[:need] < E).all() and (tile_expert[need:] == E).all()
    assert torch.equal(tile_expert[:need], tile_expert[:need].sort().values)  # grouped by expert


def test_select_experts_by_hand():
    # softmax of log(p) is p: rows [.1 .2 .3 .4] and [.5 .1 .3 .1]
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 3.0, 1.0]]).log()
    weights, ids = select_experts(logits, 2, renormalize=False)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert ids.tolist() == [[3, 2], [0, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.3], [0.5, 0.3]]))
    weights, ids = select_experts(logits, 2, renormalize=True)
    assert ids.tolist() == [[3, 2], [0, 2]]
    torch.testing.assert_close(weights, torch.tensor([[4 / 7, 3 / 7], [0.625, 0.375]]))
    weights, _ = select_experts(logits.to(torch.bfloat16), 1, renormalize=True)
    assert weights.dtype == torch.float32 and torch.equal(weights, torch.ones(2, 1))


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "w2": a["w2"][:, :, :-1]}, "w2"),
        (lambda a: {**a, "w13": a["w13"].half()}, "dtype"),
        (lambda a: {**a, "topk_weights": a["topk_weights"].half()}, "topk_weights"),
        (lambda a: {**a, "topk_ids": a["topk_ids"].float()}, "topk_ids"),
        (lambda a: {**a, "topk_ids": a["topk_ids"][:2]}, "topk_ids"),
        (lambda a: {**a, "hidden": a["hidden"].t()}, "contiguous"),
        (lambda a: {**a, "out": torch.empty(3, 47)}, "out"),
    ],
)
def test_bad_arguments_are_refused(change, match):
    hidden, w13, w2, weights, ids = _case(3, 4, 2, 16, 16, torch.float32, seed=0)
    args = dict(hidden=hidden, w13=w13, w2=w2, topk_weights=weights, topk_ids=ids)
    with pytest.raises(ValueError, match=match):
        fused_moe(**change(args))


def test_dispatch_picks_backend(monkeypatch):
    args = _case(3, 4, 2, 16, 16, torch.float32, seed=1)
    calls = []
    monkeypatch.setattr(fm, "fused_moe", lambda *a: calls.append("triton"))
    monkeypatch.setattr(fm, "fused_moe_ref", lambda *a: calls.append("ref"))
    for mode in ("auto", "triton", "ref"):
        monkeypatch.setenv("PDSERVE_KERNELS", mode)
        dispatch.fused_moe(*args)
    assert calls == ["ref", "triton", "ref"]


def test_bench_smoke_writes_records(tmp_path):
    """bench/moe.py --smoke: the toy shape on CPU through the same code as the GPU run, records in the format
    of docs/architecture.md."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, os.path.join(REPO, "bench", "moe.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (path,) = glob.glob(str(tmp_path / "moe-cpu-*.json"))
    with open(path) as f:
        records = json.load(f)["records"]
    moe = [r for r in records if r["metric"] == "moe_ms"]
    assert {(r["params"]["phase"], r["params"]["tokens"]) for r in moe} == {
        ("decode", 1),
        ("decode", 3),
        ("prefill", 20),
    }
    for r in moe:
        assert r["value"] > 0 and r["ceiling"] > 0 and r["baseline"] > 0 and r["params"]["matches_ref"], r
    assert {"copy_bandwidth_GBps", "matmul_TFLOPs"} <= {r["metric"] for r in records}


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 64, 512])
@pytest.mark.parametrize("E,K,H,inter", [(128, 8, 2048, 768), (8, 2, 4096, 1792)])
def test_triton_matches_ref_gpu(T, E, K, H, inter):
    """bf16 at Qwen3-30B-A3B's expert shape and Mixtral's hidden size; no host sync in the kernel path."""
    args = _case(T, E, K, H, inter, torch.bfloat16, seed=T, device="cuda")
    want = fused_moe_ref(*args)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fused_moe(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
