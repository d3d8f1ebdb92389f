"""A/B in one process: a Llama-8B-shape decode step (CUDA graphs) with the skinny linear, with cuBLAS, and with
the skinny linear again; per-step time as the runner drives it, the replay alone, and the per-kernel profile at
batch 1 (GPU only; argument: a checkpoint, e.g. models/bench/llama-3.1-8b written by bench/engine.py).
Logged: bench/results/decode_ab-h100-20261123.log"""
import os, random, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from engine import LLM
from engine.cuda_graphs import DecodeGraphs
import kernels.dispatch as dispatch
from bench.engine_ours import decode_chunks

path = sys.argv[1]
llm = LLM(model=path, device="cuda", dtype="bfloat16", block_size=16, max_model_len=8320, max_num_seqs=64,
          max_num_batched_tokens=8192, enable_prefix_caching=False, gpu_memory_utilization=0.9)
runner = llm.core.runner
vocab = runner.arch.vocab_size
rng = random.Random(0)

def measure(tag):
    for batch, ctx in [(1, 512), (8, 512)]:
        chunks, _ = decode_chunks(batch, ctx, 16, vocab, rng)
        rows = list(range(batch))
        for _ in range(5):
            runner.execute(chunks, rows)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter(); s.record()
        for _ in range(50):
            runner.execute(chunks, rows)
        e.record(); e.synchronize(); wall = (time.perf_counter() - t0) / 50 * 1e3
        g = runner.graphs.graphs[next(x for x in runner.graphs.buckets if x >= batch)]
        s2, e2 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s2.record()
        for _ in range(50):
            g.replay()
        e2.record(); e2.synchronize()
        print(f"=== {tag} b{batch} ctx{ctx}: execute wall {wall:.3f} ms, device {s.elapsed_time(e)/50:.3f} ms, replay only {s2.elapsed_time(e2)/50:.3f} ms")
        if batch == 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    g.replay()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=50))

measure("skinny")
dispatch.SKINNY_MIN_WEIGHT = 1 << 62
runner.graphs = None
torch.cuda.empty_cache()
runner.graphs = DecodeGraphs(runner, max_batch=64)
measure("cublas")
dispatch.SKINNY_MIN_WEIGHT = 1 << 24
runner.graphs = None
torch.cuda.empty_cache()
runner.graphs = DecodeGraphs(runner, max_batch=64)
measure("skinny-again")
