"""A/B in one process: a Llama-8B-shape decode step (CUDA graphs) with the skinny linear, with cuBLAS, and
with the skinny linear again; per-step time as the runner drives it, the replay alone, and the per-kernel
profile at batch 1 (GPU only).

  python bench/decode_ab.py models/bench/llama-3.1-8b     # a checkpoint bench/engine.py wrote
Logged: bench/results/logs/decode_ab-h100-20261123.log.gz
"""

from __future__ import annotations

import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pdserve.kernels.dispatch as dispatch  # noqa: E402
from bench.common import device_ms  # noqa: E402
from bench.engine_ours import decode_chunks  # noqa: E402
from pdserve.engine import LLM  # noqa: E402
from pdserve.engine.cuda_graphs import DecodeGraphs  # noqa: E402

SKINNY_ON, SKINNY_OFF = dispatch.SKINNY_MIN_WEIGHT, 1 << 62


def recapture(runner, min_weight: int) -> None:
    """Route linears by this threshold and capture the decode graphs again (the routing is baked into
    them)."""
    dispatch.SKINNY_MIN_WEIGHT = min_weight
    runner.graphs = None
    torch.cuda.empty_cache()
    runner.graphs = DecodeGraphs(runner, max_batch=runner.config.scheduler.max_num_seqs)


def measure(runner, tag: str, rng: random.Random) -> None:
    for batch, ctx in [(1, 512), (8, 512)]:
        chunks, _ = decode_chunks(batch, ctx, runner.block_size, runner.arch.vocab_size, rng)
        rows = list(range(batch))
        step = device_ms(lambda chunks=chunks, rows=rows: runner.execute(chunks, rows), 5)  # warm up
        step = device_ms(lambda chunks=chunks, rows=rows: runner.execute(chunks, rows), 50)
        graph = runner.graphs.graphs[next(size for size in runner.graphs.buckets if size >= batch)]
        print(
            f"=== {tag} b{batch} ctx{ctx}: step {step:.3f} ms, replay only {device_ms(graph.replay, 50):.3f} "
            f"ms"
        )
        if batch == 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                device_ms(graph.replay, 10)
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50)
            )


def main(path: str) -> None:
    llm = LLM(
        model=path,
        device="cuda",
        dtype="bfloat16",
        block_size=16,
        max_model_len=8320,
        max_num_seqs=64,
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
        gpu_memory_utilization=0.9,
    )
    runner, rng = llm.core.runner, random.Random(0)
    measure(runner, "skinny", rng)
    recapture(runner, SKINNY_OFF)
    measure(runner, "cublas", rng)
    recapture(runner, SKINNY_ON)
    measure(runner, "skinny-again", rng)


if __name__ == "__main__":
    main(sys.argv[1])
