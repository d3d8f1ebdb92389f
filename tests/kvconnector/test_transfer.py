"""Two real processes move random paged KV; the consumer's blocks equal the producer's byte for byte.

One producer and one consumer process per transport run every dtype x layout (a fresh connector pair each),
with chunked prefill (several steps per prompt), a partial last block, prefix hits on the consumer, and
several requests. Block accounting holds after each.
"""

import pytest

LAYOUTS = [
    dict(block_size=16, num_layers=3, num_kv_heads=2, head_dim=16),
    dict(block_size=8, num_layers=2, num_kv_heads=4, head_dim=8),
]
DTYPES = ["bfloat16", "float16", "float32"]


def check_accounting(state, busy=0):
    assert state["free"] + state["used"] + state["cached"] == state["total"]
    assert state["used"] == busy, state
    assert state["active"] == []


def run_case(prod, cons, transport, dtype, layout, seed, devices=("cpu", "cpu"), extra=None):
    cfg = dict(model="tiny", dtype=dtype, kv_connector=transport, secret="test-secret", timeout=5.0, **layout)
    cfg["extra"] = extra or {}
    address = cons.call("open", role="consumer", cfg=cfg, num_blocks=96, seed=seed, device=devices[1])
    prod.call("open", role="producer", cfg=cfg, num_blocks=80, seed=seed + 1, device=devices[0])
    bs = layout["block_size"]
    cases = [("a", 7 * bs + 3, 2 * bs, 0), ("b", 5 * bs, 3 * bs + 1, 2), ("c", 1, 16, 0)]
    for rid, num_tokens, chunk, cached in cases:
        res = cons.call("reserve", rid=rid, num_tokens=num_tokens, num_cached=cached)
        out = prod.call(
            "transfer", rid=rid, address=address, num_tokens=num_tokens, chunk_tokens=chunk, **res
        )
        assert "error" not in out, out
        assert cons.call("wait_finished", rid=rid) is not None, f"{rid}: the consumer never completed"
        assert out["num_cached"] == cached and len(out["remote"]) == -(-num_tokens // bs) - cached
        sent = prod.call("block_bytes", block_ids=out["local"][cached:])
        got = cons.call("block_bytes", block_ids=out["remote"])
        assert got == sent, f"{transport} {dtype} {layout} request {rid}: consumer blocks differ"
    cstate, pstate = cons.call("state"), prod.call("state")
    for rid, *_ in cases:
        assert pstate["finished"][rid] == {"ok": True, "cause": "", "calls": 1}
        assert cstate["finished"][rid] == {"ok": True, "cause": "", "calls": 1}
        assert pstate["free_calls"][rid] == 1 and rid not in cstate["free_calls"]
    # metrics: every byte counted once on each side, one transfer-time observation per request
    item = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
    per_block = layout["num_layers"] * 2 * bs * layout["num_kv_heads"] * layout["head_dim"] * item
    sent = sum(-(-n // bs) - c for _, n, _, c in cases) * per_block
    pm, cm = pstate["metrics"], cstate["metrics"]
    assert pm["pdserve_kv_bytes_sent_total"] == cm["pdserve_kv_bytes_received_total"] == sent
    assert pm["pdserve_kv_transfer_seconds_count"] == len(cases)
    # over tcp the consumer sees the first chunk arrive; a one-sided write leaves it nothing to time but Done
    assert cm["pdserve_kv_transfer_seconds_count"] == (len(cases) if transport == "tcp" else 0)
    assert (
        pm["pdserve_kv_exposed_transfer_seconds_count"] == len(cases) and pm["pdserve_kv_achieved_gbps"] > 0
    )
    assert pm["pdserve_kv_inflight_transfers"] == cm["pdserve_kv_inflight_transfers"] == 0
    # the consumer's blocks now belong to its node (decode would run on them); the producer's node freed its
    # own on on_free (a real prefill node would keep them in its prefix cache)
    check_accounting(cstate, busy=sum(-(-n // bs) - c for _, n, _, c in cases))
    check_accounting(pstate, busy=0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_byte_exact_two_processes(pair):
    prod, cons = pair
    for i, (dtype, layout) in enumerate((d, lay) for d in DTYPES for lay in LAYOUTS):
        run_case(prod, cons, "tcp", dtype, layout, seed=10 * i)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("devices", [("cuda:0", "cuda:0"), ("cuda:0", "cuda:1")], ids=["one-gpu", "two-gpus"])
@pytest.mark.parametrize(
    "transport, extra",
    [("cuda_ipc", {}), ("cuda_ipc", {"coalesce_bytes": 0}), ("nixl", {})],
    ids=["cuda_ipc-coalesced", "cuda_ipc-per-layer", "nixl"],
)
def test_gpu_planes_byte_exact_two_processes(pair, devices, transport, extra):
    """cuda_ipc's tiny test layouts fit under coalesce_bytes: the default copies them in one launch after the
    last layer; coalesce_bytes 0 forces the per-layer launches."""
    import torch

    from pdserve.kvconnector.transport.nixl import nixl_available

    if torch.cuda.device_count() < 1 + (devices[1] == "cuda:1"):
        pytest.skip("needs two GPUs")
    if transport == "nixl" and not nixl_available():
        pytest.skip("needs the nixl package")
    prod, cons = pair
    for i, (dtype, layout) in enumerate((d, lay) for d in DTYPES for lay in LAYOUTS):
        run_case(prod, cons, transport, dtype, layout, seed=10 * i, devices=devices, extra=extra)


@pytest.mark.timeout(60)
def test_layout_mismatch_is_refused(pair):
    prod, cons = pair
    base = dict(model="tiny", dtype="float16", kv_connector="tcp", secret="s", timeout=5.0, **LAYOUTS[0])
    address = cons.call("open", role="consumer", cfg=base, num_blocks=16, seed=0)
    prod.call("open", role="producer", cfg={**base, "head_dim": 32}, num_blocks=16, seed=1)
    out = prod.call("transfer", rid="x", address=address, num_tokens=20, chunk_tokens=20, remote=[0, 1])
    assert "error" in out and "head_dim" in out["error"] and "mismatch" in out["error"], out
