"""KV transfer benchmark: a prefill process writes a request's KV layer by layer into a decode process's
blocks.

Two processes (spawned), each with its own paged KV cache of Llama-3.1-8B shape (32 layers, 8 KV heads, head
dim 128, bf16, block 16), connected by our connector (KVProducer -> KVConsumer) over the one-sided `cuda_ipc`
plane:
  (a) back_to_back  every layer saved at once: from the first save_layer to the decode side's completion (the
                    producer's Done after its fence); ceiling: a raw NCCL send/recv of one buffer of the same
                    bytes, same run (goal: ratio >= 0.75 at 2048 and 8192 tokens).
  (b) overlapped    each layer preceded by simulated compute (bf16 matmuls calibrated to --layer-ms, default
      the
                    H100 prefill floor: 42 ms per 2048 tokens over 32 layers): the exposed transfer, from the
                    last layer's compute end to all KV landed (goal <= 0.2 ms at 2048 tokens); ceiling: the
                    last layer's bytes alone at the raw NCCL rate. Reported twice: on the host clock (to the
                    decode side's completion, wire and wake-ups included) and on the device clock (last layer
                    computed -> last copy landed, CUDA events).
  (0) one_block     the fixed cost of a request: one block of every layer (KiB) pushed back to back, first
                    save_layer to landed; bandwidth plays no part, hand-offs between threads, wakeups and
                    syncs do.
`--gpus 1` puts both processes on cuda:0 and the ceiling is a device copy of the same bytes. `--smoke` runs a
tiny shape on CPU over tcp (the test suite runs it).

`--shape gemma-2-9b` (42 layers, 8 KV heads, head dim 256; every other layer slides over 4096 tokens) runs
each figure twice: `window`, where a sliding layer ships only the blocks its window will read on the decode
node, and `full`, every block of every layer as a full-attention model of the same shape would.
`kv_shipped_MiB` records the bytes of each, the full figure as its baseline.

`--tp-pairs 2:1 1:2` splits each side's cache over its tensor-parallel ranks by KV head, as such a node holds
it, so the plane writes each prefill rank's heads into the decode ranks that hold them (cases `-tp2to1`, ...);
the first push of each is checked: the decode side's blocks hold, head for head, what the prefill side sent.

  python bench/kv_transfer.py                      # 2 GPUs: cuda_ipc, 2048 and 8192 tokens
  python bench/kv_transfer.py --gpus 1             # one GPU, two processes
  python bench/kv_transfer.py --gpus 1 --shape gemma-2-9b --tokens 8192 16384
  python bench/kv_transfer.py --gpus 1 --tp-pairs 1:1 2:1 1:2 4:2   # between tensor-parallel sizes
  python bench/kv_transfer.py --gpus 1 --transports cuda_ipc nixl --tp-pairs 1:1 2:1 1:2 4:2
  python bench/kv_transfer.py --smoke --out /tmp/x # CPU, tcp, seconds
Results: bench/results/kv_transfer-<device>-<YYYYMMDD>.json (the format in docs/architecture.md) and a PNG
beside it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import device_results, guarded  # noqa: E402
from bench.kv_transfer_node import Proc  # noqa: E402
from pdserve.benchmarks.plots import plot_ratios  # noqa: E402
from pdserve.benchmarks.results import log  # noqa: E402
from pdserve.wire.sliding_window import shipped_from  # noqa: E402

LLAMA8B = dict(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
GEMMA2_9B = dict(
    num_layers=42, num_kv_heads=8, head_dim=256, block_size=16, dtype="bfloat16", layer_windows=(4096, 0) * 21
)
TINY = dict(num_layers=4, num_kv_heads=2, head_dim=16, block_size=16, dtype="float32")
TINY_WINDOW = dict(TINY, layer_windows=(24, 0, 24, 0))
SHAPES = {"llama-3.1-8b": LLAMA8B, "gemma-2-9b": GEMMA2_9B}


# ---------------------------------------------------------------------------------------------- the run


def kv_bytes(layout, tokens):
    """Bytes one request of `tokens` prompt tokens ships: every block of a full-attention layer, a sliding
    layer's window blocks only."""
    n = -(-tokens // layout["block_size"])
    item = 2 if layout["dtype"] in ("bfloat16", "float16") else 4
    windows = layout.get("layer_windows") or (0,) * layout["num_layers"]
    pieces = sum(n - skip for skip in shipped_from(windows, tokens, layout["block_size"]))
    return pieces * 2 * layout["block_size"] * layout["num_kv_heads"] * layout["head_dim"] * item


def variants(layout) -> dict:
    """case suffix -> layout: a sliding-window shape runs as it is and as full attention (the baseline)."""
    if not any(layout.get("layer_windows") or ()):
        return {"": layout}
    return {"-window": layout, "-full": dict(layout, layer_windows=(0,) * layout["num_layers"])}


def measure_push(
    res, prod, cons, transport, case, layout, tokens, iters, ceiling_ms, layer_ms, order, tps=(1, 1)
):
    """tps: (prefill TP, decode TP): each side's cache split over its ranks by KV head."""
    nbytes = kv_bytes(layout, tokens)
    n_blocks = 2 * -(-tokens // layout["block_size"]) + 8
    address = cons.call(
        "open",
        role="consumer",
        transport=transport,
        layout=layout,
        num_blocks=n_blocks,
        shuffle=order == "shuffled",
        tp=tps[1],
    )
    prod.call(
        "open",
        role="producer",
        transport=transport,
        layout=layout,
        num_blocks=n_blocks,
        address=address,
        shuffle=order == "shuffled",
        tp=tps[0],
    )
    prod.call("calibrate", layer_ms=layer_ms, tokens=tokens)
    params = dict(
        case=case,
        transport=transport,
        tokens=tokens,
        bytes=nbytes,
        layers=layout["num_layers"],
        blocks=order,
        **({"prefill_tp": tps[0], "decode_tp": tps[1]} if tps != (1, 1) else {}),
    )
    for mode in ("one_block", "back_to_back", "overlapped"):
        n_tok = layout["block_size"] if mode == "one_block" else tokens
        spans, exposed, exposed_gpu, host_us = [], [], [], []
        for i in range(iters + 2):
            rid = f"{mode}-{tokens}-{i}"
            remote = cons.call("expect", rid=rid, tokens=n_tok)
            t_start, t_last, gpu_ms, save_us = prod.call(
                "push", rid=rid, tokens=n_tok, overlapped=mode == "overlapped", remote=remote
            )
            t_landed = cons.call("wait_landed", rid=rid)
            if i == 0 and mode == "back_to_back" and tps != (1, 1):  # every head landed where it belongs
                sent = prod.call("checksum", blocks=prod.call("source_blocks", tokens=n_tok))
                got = cons.call("checksum", blocks=remote)
                if sent != got:
                    raise RuntimeError(f"TP {tps}: the decode side holds {got}, the prefill side sent {sent}")
                params["verified"] = True
            if i >= 2:
                spans.append((t_landed - t_start) * 1e3)
                exposed.append((t_landed - t_last) * 1e3)
                host_us.append(save_us)
                if gpu_ms is not None:
                    exposed_gpu.append(gpu_ms)
        p = dict(params, mode=mode, iters=iters, save_layer_host_us=round(statistics.median(host_us), 1))
        if mode == "one_block":
            # The fixed per-request cost: one block of every layer (a few KiB) pushed back to back, save_layer
            # of layer 0 to landed on the decode side. Bandwidth plays no part; hand-offs, wakeups and syncs
            # do.
            ms = statistics.median(spans)
            res.add(
                "push_one_block_ms",
                round(ms, 4),
                "ms",
                params=dict(
                    p,
                    tokens=n_tok,
                    bytes=kv_bytes(layout, n_tok),
                    min_ms=round(min(spans), 4),
                    max_ms=round(max(spans), 4),
                ),
            )
        elif mode == "back_to_back":
            ms = statistics.median(spans)
            res.add(
                "push_all_layers_ms",
                round(ms, 4),
                "ms",
                ceiling=round(ceiling_ms, 4),
                ratio=round(ceiling_ms / ms, 3),
                params=dict(p, gbps=round(nbytes / ms / 1e6, 2), goal_ratio=0.75),
            )
        else:
            floor = ceiling_ms / layout["num_layers"]  # the last layer's bytes alone at the raw rate

            add_exposed(
                res,
                "exposed_transfer_ms",
                exposed,
                floor,
                dict(p, layer_ms=layer_ms, total_ms=round(statistics.median(spans), 3)),
                "host: last layer computed -> decode side completed",
            )
            if exposed_gpu:
                add_exposed(
                    res,
                    "exposed_transfer_gpu_ms",
                    exposed_gpu,
                    floor,
                    dict(p, layer_ms=layer_ms),
                    "device: last layer computed -> last copy landed",
                )


def add_exposed(res, metric: str, samples: list, floor_ms: float, params: dict, clock: str) -> None:
    """One exposed-transfer figure (median of the samples) against the last layer's bytes at the raw rate."""
    ms = statistics.median(samples)
    res.add(
        metric,
        round(ms, 4),
        "ms",
        ceiling=round(floor_ms, 4),
        ratio=round(min(floor_ms / ms, 1.0), 3) if ms > 0 else 1.0,
        params=dict(params, goal_ms=0.2, clock=clock),
    )


def measure_tokens(res, prod, cons, args, layout, t, suffix, transports, failures, layer_ms_2048) -> None:
    """Every figure for one prompt length and layout: the ceiling for its bytes, then each transport and block
    order."""
    case_gpus = ("cpu" if args.smoke else f"{args.gpus}gpu") + suffix
    iters = args.iters
    nbytes = kv_bytes(layout, t)
    full = kv_bytes(dict(layout, layer_windows=()), t)
    log(f"--- {t} tokens{suffix}: {nbytes / 2**20:.1f} MiB of KV shipped ({full / 2**20:.1f} MiB in full)")
    res.add(
        "kv_shipped_MiB",
        round(nbytes / 2**20, 2),
        "MiB",
        baseline=round(full / 2**20, 2),
        params=dict(
            case=case_gpus, tokens=t, saved=round(1 - nbytes / full, 4), what="baseline: every layer in full"
        ),
    )
    if prod.device != cons.device:
        port = cons.call("raw_store")
        cons.send("raw_nccl", rank=1, port=port, nbytes=nbytes, iters=iters)
        prod.send("raw_nccl", rank=0, port=port, nbytes=nbytes, iters=iters)
        ceiling, _ = prod.get(), cons.get()
        metric = "raw_nccl_one_buffer_ms"
    else:
        ceiling = prod.call("copy_ms", nbytes=nbytes, iters=10 * iters)
        metric = "device_copy_ms"
    res.add(
        metric,
        round(ceiling, 4),
        "ms",
        params=dict(case=case_gpus, tokens=t, bytes=nbytes, gbps=round(nbytes / ceiling / 1e6, 2)),
    )
    for transport in transports:
        for order, tps in itertools.product(args.block_order, args.tp_pairs):
            label = ("" if order == "shuffled" else f"-{order}") + (
                "" if tps == (1, 1) else f"-tp{tps[0]}to{tps[1]}"
            )
            with guarded(f"{transport} {t} tokens{suffix} {order} tp {tps}", failures):
                measure_push(
                    res,
                    prod,
                    cons,
                    transport,
                    f"{transport}-{case_gpus}{label}",
                    layout,
                    t,
                    iters,
                    ceiling,
                    layer_ms_2048 * t / 2048,
                    order,
                    tps,
                )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shape on CPU over tcp")
    ap.add_argument("--gpus", type=int, default=2, choices=(1, 2))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--transports", nargs="+", default=None)
    ap.add_argument(
        "--block-order",
        nargs="+",
        default=["shuffled"],
        choices=["shuffled", "sequential"],
        help="both sides' blocks: shuffled (a busy cache) or sequential (long runs, a fresh one)",
    )
    ap.add_argument(
        "--iters", type=int, default=None, help="measured iterations per figure (default 5; smoke 3)"
    )
    ap.add_argument(
        "--layer-ms", type=float, default=None, help="simulated compute per layer per 2048 tokens"
    )
    ap.add_argument(
        "--tp-pairs",
        nargs="+",
        default=["1:1"],
        help="prefill TP:decode TP pairs; each side's cache split by KV head as its ranks hold it (2:1 1:2)",
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    args.tp_pairs = [tuple(int(x) for x in pair.split(":")) for pair in args.tp_pairs]
    args.iters_set = args.iters is not None
    args.iters = args.iters if args.iters_set else 5
    if args.smoke:
        layout = TINY_WINDOW if args.shape == "gemma-2-9b" else TINY
        tokens, transports = args.tokens or [64], args.transports or ["tcp"]
        devices, iters, layer_ms_2048 = (
            ("cpu", "cpu"),
            args.iters if args.iters_set else 3,
            args.layer_ms or 20.0,
        )
    else:
        layout, tokens = SHAPES[args.shape], args.tokens or [2048, 8192]
        transports = args.transports or ["cuda_ipc"]
        devices = ("cuda:0", "cuda:1") if args.gpus == 2 else ("cuda:0", "cuda:0")
        iters, layer_ms_2048 = args.iters, args.layer_ms or 42.0 / 32
    args.iters = iters
    env: dict = {}
    res = device_results("kv_transfer", devices[0], args.out)
    failures: list[str] = []
    prod, cons = Proc(devices[0], env), Proc(devices[1], env)
    try:
        for t in tokens:
            for suffix, shape in variants(layout).items():
                measure_tokens(res, prod, cons, args, shape, t, suffix, transports, failures, layer_ms_2048)
    finally:
        prod.close()
        cons.close()
    log(f"results: {res.path}")
    if not args.smoke:
        plot_ratios(res.path)
    for f in failures:
        log(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
