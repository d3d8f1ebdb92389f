"""Our engine's figures: prefill and decode steps driven through ModelRunner.execute with synthetic block
tables, and end-to-end throughput through LLM.generate. `bench` is bench/engine.py's Bench (args, device,
sizes, results, measured ceilings)."""

from __future__ import annotations

import math
import random
import time

from bench.common import sync, time_fn
from bench.engine_floors import Shape
from pdserve.benchmarks.results import log

FIRST_ID = 10  # token ids below this are the tokenizer's special tokens


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def bench_prefill(bench, runner, name: str, shape: Shape) -> None:
    """One sequence of T tokens from an empty cache: the whole prompt in one step, the last token's logits."""
    from pdserve.engine.scheduler_output import ScheduledRequest

    rng = random.Random(7)
    for tokens in bench.sizes.prefill_tokens:
        if bench.out_of_time(f"{name} prefill {tokens}"):
            return
        blocks = math.ceil((tokens + 1) / runner.block_size)
        if blocks > runner.num_blocks:
            log(f"  SKIPPED prefill {tokens}: needs {blocks} blocks, the cache has {runner.num_blocks}")
            continue
        chunk = ScheduledRequest(
            request_id="bench-prefill",
            token_ids=random_ids(rng, tokens, shape.vocab),
            num_computed_tokens=0,
            block_ids=list(range(blocks)),
            is_decode=False,
            samples=True,
        )
        t = time_fn(
            lambda chunk=chunk: runner.execute([chunk], [0]),
            bench.device,
            warmup=bench.sizes.warmup,
            iters=bench.sizes.iters,
            max_seconds=8.0,
        )
        add_prefill_record(bench, "prefill_ms", name, shape, tokens, t)


def tp_floor(bench, shape: Shape, floor_s: float, rows: int) -> tuple[float, dict]:
    """With --tp N: the per-GPU floor (floor / N) plus the step's 2 x layers + 1 all-reduces of [rows, hidden]
    as measured in this run; and the params that say so."""
    tp = bench.args.tp
    if tp == 1:
        return floor_s, {}
    each = bench.allreduce_s.get(rows)
    if each is None:
        return floor_s / tp, {"tp": tp, "allreduce": "not measured for this row count"}
    count = 2 * shape.layers + 1
    return floor_s / tp + count * each, {
        "tp": tp,
        "per_gpu_floor_ms": round(floor_s / tp * 1e3, 4),
        "allreduce_ms_each": round(each * 1e3, 4),
        "allreduces": count,
    }


def add_prefill_record(bench, metric: str, name: str, shape: Shape, tokens: int, t: dict, **extra) -> None:
    floor_s, tp_params = tp_floor(
        bench, shape, shape.prefill_floor_s(tokens, bench.matmul_rate, bench.copy_bw), tokens
    )
    flop = shape.prefill_flop(tokens)
    ms = t["median_ms"]
    bench.results.add(
        metric,
        round(ms, 4),
        "ms",
        ceiling=round(floor_s * 1e3, 4),
        ratio=round(floor_s * 1e3 / ms, 4),
        params={
            "model": name,
            "tokens": tokens,
            "tflop": round(flop / 1e12, 3),
            "flop_2NT_tflop": round(2 * shape.total_params * tokens / 1e12, 3),
            "achieved_tflops": round(flop / (ms / 1e3) / 1e12, 1),
            "floor": "matmul FLOP (linear + causal attention) / measured matmul rate",
            "min_ms": round(t["min_ms"], 4),
            "n": t["n"],
            **tp_params,
            **extra,
        },
    )


def decode_chunks(batch: int, context: int, block_size: int, vocab: int, rng: random.Random):
    """B decode rows at position `context` (context tokens already cached), each with its own blocks."""
    from pdserve.engine.scheduler_output import ScheduledRequest

    per_seq = math.ceil((context + 1) / block_size)
    return [
        ScheduledRequest(
            request_id=f"bench-decode-{i}",
            token_ids=[rng.randrange(FIRST_ID, vocab)],
            num_computed_tokens=context,
            block_ids=list(range(i * per_seq, (i + 1) * per_seq)),
            is_decode=True,
            samples=True,
        )
        for i in range(batch)
    ], batch * per_seq


def bench_decode(bench, runner, name: str, shape: Shape) -> None:
    rng = random.Random(8)
    graphs = getattr(runner, "graphs", None)
    for context in bench.sizes.decode_contexts:
        for batch in bench.sizes.decode_batches:
            if bench.out_of_time(f"{name} decode b{batch} ctx{context}"):
                return
            chunks, blocks = decode_chunks(batch, context, runner.block_size, shape.vocab, rng)
            if blocks > runner.num_blocks:
                reason = (
                    f"needs {blocks} blocks "
                    f"({blocks * shape.kv_bytes_per_token * runner.block_size / 2**30:.1f} "
                    f"GiB of KV), the cache holds {runner.num_blocks}: does not fit beside the weights"
                )
                log(f"  SKIPPED decode b{batch} ctx{context}: {reason}")
                bench.results.add(
                    "decode_step_ms",
                    None,
                    "ms",
                    params={"model": name, "batch": batch, "context": context, "skipped": reason},
                )
                continue
            rows = list(range(batch))
            for mode in ("graph", "eager"):
                if mode == "graph" and graphs is None:
                    log(f"  (no CUDA graphs on this runner: decode b{batch} ctx{context} eager only)")
                    continue
                runner.graphs = graphs if mode == "graph" else None  # None: the path --enforce-eager takes
                try:
                    t = time_fn(
                        lambda chunks=chunks, rows=rows: runner.execute(chunks, rows),
                        bench.device,
                        warmup=bench.sizes.warmup,
                        iters=bench.sizes.decode_iters,
                        max_seconds=5.0,
                    )
                finally:
                    runner.graphs = graphs
                used_graph = mode == "graph" and graphs.fits(batch)
                add_decode_record(
                    bench, "decode_step_ms", name, shape, batch, context, t, mode=mode, cuda_graphs=used_graph
                )


def add_decode_record(
    bench, metric: str, name: str, shape: Shape, batch: int, context: int, t: dict, **extra
):
    floor_s, tp_params = tp_floor(
        bench, shape, shape.decode_floor_s(batch, context, bench.matmul_rate, bench.copy_bw), batch
    )
    nbytes = shape.decode_bytes(batch, context)
    ms = t["median_ms"]
    bench.results.add(
        metric,
        round(ms, 4),
        "ms",
        ceiling=round(floor_s * 1e3, 4),
        ratio=round(floor_s * 1e3 / ms, 4),
        params={
            "model": name,
            "batch": batch,
            "context": context,
            **extra,
            "gb_read": round(nbytes / 1e9, 3),
            "achieved_GBps": round(nbytes / (ms / 1e3) / 1e9, 1),
            "tok_s": round(batch / (ms / 1e3), 1),
            "floor": "max(weights + KV bytes / copy bandwidth, FLOP / matmul rate)",
            "min_ms": round(t["min_ms"], 4),
            "n": t["n"],
            **tp_params,
        },
    )


def bench_throughput(bench, llm, name: str, shape: Shape, engine_args: dict) -> None:
    from pdserve.engine import SamplingParams

    s = bench.sizes
    rng = random.Random(9)

    def prompts():
        return [{"prompt_token_ids": random_ids(rng, s.gen_input, shape.vocab)} for _ in range(s.gen_batch)]

    # 1. Warm up on other prompts (Triton compiles per shape; the graphs were captured at start).
    started = time.perf_counter()
    llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=min(8, s.gen_output), ignore_eos=True))
    log(f"  warmup generate: {time.perf_counter() - started:.1f} s")
    if bench.out_of_time(f"{name} throughput"):
        return
    # 2. The timed run.
    batch = prompts()
    steps_before = llm.core.stats.steps
    sync(bench.device)
    started = time.perf_counter()
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=s.gen_output, ignore_eos=True))
    sync(bench.device)
    seconds = time.perf_counter() - started
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != s.gen_batch * s.gen_output:
        log(f"  WARNING: produced {produced} tokens, expected {s.gen_batch * s.gen_output}")
    floor_s = shape.generate_floor_s(s.gen_batch, s.gen_input, s.gen_output, bench.matmul_rate, bench.copy_bw)
    ceiling = s.gen_batch * s.gen_output / floor_s
    value = produced / seconds
    bench.results.add(
        "throughput_tok_s",
        round(value, 1),
        "tok/s",
        ceiling=round(ceiling, 1),
        ratio=round(value / ceiling, 4),
        params={
            "model": name,
            "batch": s.gen_batch,
            "input_len": s.gen_input,
            "output_len": s.gen_output,
            "seconds": round(seconds, 3),
            "total_tok_s": round(s.gen_batch * (s.gen_input + s.gen_output) / seconds, 1),
            "steps": llm.core.stats.steps - steps_before,
            "engine_args": engine_args,
            "floor": "prefill floor + (output-1) decode-step floors, as output tokens/s",
            "note": "LLM.generate end to end: scheduling, sampling and detokenization included",
        },
    )
