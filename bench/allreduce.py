"""The all-reduce a tensor-parallel step pays, measured on the group the engine would form (engine.py --tp).

Ranks 1..N-1 are spawned processes, rank 0 is the caller, joined as the engine joins them
(pdserve/engine/tensor_parallel.py: NCCL on GPUs, gloo on CPU or with PDSERVE_TP_BACKEND=gloo). For each row
count, the median wall time of one in-place all-reduce of [rows, hidden] in the model's dtype, each call timed
alone between device syncs. A TP step's floor adds 2 x layers + 1 of them (o_proj and down_proj per layer, the
embedding) to its per-GPU bytes or FLOP floor.
"""

from __future__ import annotations

import statistics
import time

import torch

ITERS = 20


def _time_allreduces(group, device: str, rows_list: list[int], hidden: int, dtype: torch.dtype) -> dict:
    out = {}
    for rows in rows_list:
        x = torch.ones(rows, hidden, dtype=dtype, device=device)
        times = []
        for i in range(ITERS + 3):
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            group.all_reduce(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            if i >= 3:
                times.append(time.perf_counter() - started)
        out[rows] = statistics.median(times)
    return out


def _rank_main(rank: int, size: int, port: int, device: str, rows_list, hidden: int, dtype) -> None:
    from pdserve.engine.tensor_parallel import TPGroup

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    group = TPGroup.join(("127.0.0.1", port), rank, size, torch.device(device))
    _time_allreduces(group, device, rows_list, hidden, dtype)


def measure_allreduce(
    size: int, devices: list[str], rows_list: list[int], hidden: int, dtype: torch.dtype
) -> dict:
    """{rows: seconds} for one all-reduce of [rows, hidden] over `size` ranks on `devices` (rank order)."""
    import torch.distributed as dist

    from pdserve.engine.tensor_parallel import COLLECTIVE_TIMEOUT, TPGroup

    store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=_rank_main, args=(r, size, store.port, devices[r], rows_list, hidden, dtype), daemon=True
        )
        for r in range(1, size)
    ]
    for p in procs:
        p.start()
    try:
        if devices[0].startswith("cuda"):
            torch.cuda.set_device(devices[0])
        group = TPGroup.join(store, 0, size, torch.device(devices[0]))
        return _time_allreduces(group, devices[0], rows_list, hidden, dtype)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
