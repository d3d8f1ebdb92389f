#!/usr/bin/env python
"""Engine benchmark: our Triton engine against the hardware floors and transformers eager, on one device.

For each model shape (random weights, written once by `pdserve make-model`'s code and reused):
  prefill     one sequence of 512 / 2048 / 8192 tokens through ModelRunner.execute; floor from the matmul rate
  decode      one step at batch 1, 8, 64, 256 x context 512, 2048 (distinct blocks per sequence), with CUDA
              graphs and eager (the runner's graphs switched off, the path --enforce-eager takes); floor from
              copy bandwidth
  throughput  512-in / 256-out at batch 64 through LLM.generate, output tokens/s; floor: prefill + 255 decode
              steps
  hf          the same shapes with transformers (bf16, sdpa): prefill, a decode step on a DynamicCache,
              generate
and `kernels`: each Triton kernel beside its torch reference at real shapes. Ceilings (copy bandwidth, bf16
matmul rate) are measured first, in the same run. Every figure is logged as it is measured and the result file
(bench/results/engine-<device>-<date>.json, the format in docs/architecture.md) is rewritten after each, so a
crash loses nothing; each section catches its own errors.

    python bench/engine.py                                   # everything, both models (H100: ~8-9 min)
    python bench/engine.py --models llama-3.1-8b --sections prefill,decode,throughput,hf --out DIR
    python bench/engine.py --models qwen2.5-0.5b --out DIR   # the other half, kernels included
    python bench/common.py merge A/engine-h100-D.json B/engine-h100-D.json -o bench/results/engine-h100-D.json
    python bench/engine.py --quick                           # a fast subset
    python bench/engine.py --models qwen3-30b-a3b --quick --sections prefill,decode,hf  # MoE, random weights
    python bench/engine.py --smoke                           # CPU, tiny model, toy sizes (CI)
    python bench/engine.py --models llama-3.1-8b --tp 2 --sections prefill,decode  # tensor parallel

With --tp N the engine runs N ranks (one GPU each; PDSERVE_TP_BACKEND=gloo puts them on one GPU, for a
correctness run) and each floor is the per-GPU one (bytes and FLOP / N) plus the all-reduces the step makes
(2 x layers + 1), timed on the same ranks first (bench/allreduce.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(_HERE)
# Run as `python bench/engine.py`, Python puts bench/ first on the path, where its modules would shadow
# same-named ones of other distributions: drop it, and put the repository root first.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, REPO_ROOT)

from bench.common import (  # noqa: E402
    device_results,
    free_memory,
    gpu_memory_gib,
    guarded,
    is_cuda,
    measure_copy_bandwidth,
    measure_matmul_rate,
)
from bench.engine_floors import Shape, link_baselines  # noqa: E402
from pdserve.benchmarks.plots import plot_ratios  # noqa: E402
from pdserve.benchmarks.results import Results, fmt, log, set_log_file  # noqa: E402

MODELS = {  # --models name -> (family, make-model preset)
    "llama-3.1-8b": ("llama", "llama-3.1-8b"),
    "llama-3.1-70b": ("llama", "llama-3.1-70b"),
    "qwen2.5-0.5b": ("qwen2", "qwen2.5-0.5b"),
    "qwen3-30b-a3b": ("qwen3_moe", "qwen3-30b-a3b"),
    "tiny": ("llama", "tiny"),
    "tiny-moe": ("qwen3_moe", "tiny"),
}
# Shapes too big to write out (61 GB) run on random weights drawn on the device (`--load-format dummy`, and
# transformers' own initialisation for its baseline); their checkpoint folder holds config and tokenizer only.
DUMMY_WEIGHTS = {"qwen3-30b-a3b", "llama-3.1-70b", "tiny-moe"}
SECTIONS = ("prefill", "decode", "throughput", "hf", "kernels")
COMPLETE_MARK = ".pdserve-bench-complete"


@dataclass
class Sizes:
    prefill_tokens: list[int]
    decode_batches: list[int]
    decode_contexts: list[int]
    gen_batch: int = 64
    gen_input: int = 512
    gen_output: int = 256
    hf_gen_output_cap: int | None = (
        None  # fewer new tokens for transformers' generate (the rest extrapolated)
    )
    hf_gen_max_s: float = 60.0  # cap transformers' generate so it runs about this long at most
    warmup: int = 3
    iters: int = 10  # prefill (bounded by time too)
    decode_iters: int = 20
    kernel_iters: int = 20
    kernel_scale: str = "real"  # real | toy


def sizes_for(args) -> Sizes:
    if args.smoke:
        return Sizes(
            [16, 64],
            [1, 4],
            [32],
            gen_batch=4,
            gen_input=16,
            gen_output=8,
            hf_gen_max_s=10,
            warmup=1,
            iters=2,
            decode_iters=3,
            kernel_iters=2,
            kernel_scale="toy",
        )
    if args.quick:
        return Sizes(
            [512, 2048],
            [1, 64],
            [2048],
            hf_gen_output_cap=64,
            hf_gen_max_s=30,
            warmup=2,
            iters=5,
            decode_iters=10,
            kernel_iters=10,
        )
    return Sizes([512, 2048, 8192], [1, 8, 64, 256], [512, 2048])


@dataclass
class Bench:
    args: argparse.Namespace
    device: object
    dtype_name: str
    sizes: Sizes
    results: Results
    deadline: float
    copy_bw: float = 0.0
    matmul_rate: float = 0.0
    allreduce_s: dict = field(default_factory=dict)  # rows -> one all-reduce of [rows, hidden] (--tp)
    failures: list[str] = field(default_factory=list)

    def out_of_time(self, what: str) -> bool:
        if time.perf_counter() < self.deadline:
            return False
        log(f"  SKIPPED {what}: past the --time-budget")
        return True

    @property
    def torch_dtype(self):
        import torch

        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
            self.dtype_name
        ]


def section(bench: Bench, name: str):
    return guarded(name, bench.failures, bench.device)


# ------------------------------------------------------------------------------------------------ checkpoints


def dummy_weights(bench: Bench, name: str) -> bool:
    return name in DUMMY_WEIGHTS or bench.args.dummy_weights


def ensure_checkpoint(bench: Bench, name: str) -> str:
    """The model's random-weight checkpoint under --model-dir, written once (a marker file says it is
    whole)."""
    family, preset = MODELS[name]
    # a config-only folder must never be taken for a checkpoint with weights by a later run
    path = os.path.join(bench.args.model_dir, name + ("-dummy" if bench.args.dummy_weights else ""))
    if os.path.exists(os.path.join(path, COMPLETE_MARK)):
        log(f"reusing checkpoint {path}")
        return path
    from pdserve.tools.make_model import make_model

    dtype = "float32" if preset == "tiny" else "bfloat16"
    weights = not dummy_weights(bench, name)
    log(f"writing {name} checkpoint ({family}, preset {preset}, {dtype}, weights {weights}) to {path} ...")
    started = time.perf_counter()
    make_model(
        path,
        family=family,
        preset=preset,
        seed=0,
        dtype=dtype,
        progress=not bench.args.smoke,
        weights=weights,
    )
    with open(os.path.join(path, COMPLETE_MARK), "w") as f:
        f.write("ok\n")
    log(f"wrote {name} checkpoint in {time.perf_counter() - started:.1f} s")
    return path


# ------------------------------------------------------------------------------------------------ ceilings


def measure_ceilings(bench: Bench) -> None:
    with section(bench, "ceilings"):
        bench.copy_bw = measure_copy_bandwidth(bench.device)
        bench.results.add(
            "copy_bandwidth_GBps",
            round(bench.copy_bw / 1e9, 1),
            "GB/s",
            params={
                "what": "device copy of 1 GiB (64 MiB on CPU), read + write bytes counted",
                "design_md_h100": 3000,
            },
        )
        bench.matmul_rate = measure_matmul_rate(bench.device)
        bench.results.add(
            "matmul_TFLOPs",
            round(bench.matmul_rate / 1e12, 1),
            "TFLOP/s",
            params={"what": "square matmul 8192^3 bf16 (512^3 fp32 on CPU)", "design_md_h100": "786-798"},
        )
    if not bench.copy_bw or not bench.matmul_rate:
        raise SystemExit("could not measure the ceilings; nothing else would mean anything")


# ------------------------------------------------------------------------------------------------ our engine


def build_llm(bench: Bench, name: str, path: str):
    """One LLM per model: its runner serves the direct prefill/decode benchmarks too (prefix caching off, so
    writing into its blocks directly can never poison a cached prefix)."""
    from pdserve.engine import LLM

    s = bench.sizes
    max_len = max(s.prefill_tokens + [max(s.decode_contexts) + 16, s.gen_input + s.gen_output]) + 64
    kwargs = dict(
        device=str(bench.device),
        dtype=bench.dtype_name,
        block_size=16,
        max_model_len=max_len,
        max_num_seqs=max(s.decode_batches + [s.gen_batch]),
        max_num_batched_tokens=max(s.prefill_tokens + [2048]),
        enable_prefix_caching=False,
        load_format="dummy" if dummy_weights(bench, name) else "auto",
        tensor_parallel_size=bench.args.tp,
    )
    if is_cuda(bench.device):
        kwargs["gpu_memory_utilization"] = bench.args.gpu_memory_utilization
    log(f"starting LLM({os.path.basename(path)}, {kwargs}) ...")
    started = time.perf_counter()
    llm = LLM(model=path, **kwargs)
    runner = llm.core.runner
    log(
        f"LLM ready in {time.perf_counter() - started:.1f} s: {runner.num_blocks} KV blocks of "
        f"{runner.block_size}, "
        f"CUDA graphs {'on' if getattr(runner, 'graphs', None) is not None else 'off'} "
        f"({gpu_memory_gib(bench.device)})"
    )
    return llm, kwargs


def run_ours(bench: Bench, name: str, path: str, shape: Shape, sections: set[str]) -> None:
    llm = None
    with section(bench, f"{name}: start our engine"):
        llm, engine_args = build_llm(bench, name, path)
    if llm is None:
        return
    from bench import engine_ours

    if "throughput" in sections:  # first: it needs the engine's blocks untouched
        with section(bench, f"{name}: throughput (LLM.generate)"):
            engine_ours.bench_throughput(bench, llm, name, shape, engine_args)
    if "prefill" in sections:
        with section(bench, f"{name}: prefill"):
            engine_ours.bench_prefill(bench, llm.core.runner, name, shape)
    if "decode" in sections:
        with section(bench, f"{name}: decode step"):
            engine_ours.bench_decode(bench, llm.core.runner, name, shape)
    del llm
    free_memory(bench.device)
    log(f"freed our engine ({gpu_memory_gib(bench.device)})")


def run_model(bench: Bench, name: str, sections: set[str]) -> None:
    if bench.out_of_time(f"{name}: everything"):
        return
    path = None
    with section(bench, f"{name}: checkpoint"):
        path = ensure_checkpoint(bench, name)
    if path is None:
        return
    shape = Shape.from_dir(name, path, dtype_bytes=2 if bench.dtype_name != "float32" else 4)
    log(f"{name}: {shape.describe()}")
    if bench.args.tp > 1:
        with section(bench, f"{name}: all-reduce over {bench.args.tp} ranks"):
            measure_tp_allreduce(bench, name, shape)
    if sections & {"prefill", "decode", "throughput"} and not bench.out_of_time(f"{name}: our engine"):
        run_ours(bench, name, path, shape, sections)
    if "hf" in sections:
        from bench import engine_hf

        with section(bench, f"{name}: transformers baseline"):
            engine_hf.run_hf(bench, name, path, shape, dummy=dummy_weights(bench, name))


def measure_tp_allreduce(bench: Bench, name: str, shape: Shape) -> None:
    from bench.allreduce import measure_allreduce

    tp, device = bench.args.tp, str(bench.device)
    shared = not is_cuda(device) or os.environ.get("PDSERVE_TP_BACKEND") == "gloo"
    devices = [device if shared else f"cuda:{r}" for r in range(tp)]
    rows = sorted(set(bench.sizes.decode_batches + bench.sizes.prefill_tokens))
    dtype = bench.torch_dtype
    bench.allreduce_s = measure_allreduce(tp, devices, rows, shape.hidden, dtype)
    for n, seconds in bench.allreduce_s.items():
        bench.results.add(
            "allreduce_ms",
            round(seconds * 1e3, 4),
            "ms",
            params={
                "model": name,
                "tp": tp,
                "rows": n,
                "hidden": shape.hidden,
                "dtype": str(dtype),
                "devices": ",".join(devices),
                "backend": os.environ.get("PDSERVE_TP_BACKEND") or ("nccl" if not shared else "gloo"),
            },
        )
        log(f"  all-reduce [{n}, {shape.hidden}] over {tp} ranks: {seconds * 1e3:.3f} ms")


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-3.1-8b,qwen2.5-0.5b", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument(
        "--model-dir",
        default=os.path.join(REPO_ROOT, "models", "bench"),
        help="where checkpoints are written once and reused",
    )
    p.add_argument(
        "--out", default=None, help="result folder (default bench/results; a temp folder with --smoke)"
    )
    p.add_argument("--quick", action="store_true", help="a fast subset of the shapes")
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny model, toy sizes: checks the code, not speed"
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--time-budget",
        type=float,
        default=540.0,
        help="seconds; measurements after this are skipped (logged) so the run ends in time",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of our engine")
    p.add_argument(
        "--dummy-weights", action="store_true", help="random weights drawn at load for every model (no files)"
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--commit",
        default=None,
        help="the commit to record, where the copy has no .git "
        "(default: git rev-parse HEAD, or $PDSERVE_COMMIT)",
    )
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if args.smoke:  # tiny models only: tiny (dense) unless tiny ones were named
        args.models = [m for m in args.models if m.startswith("tiny")] or ["tiny"]
        args.device = "cpu" if args.device == "auto" else args.device
        if args.out is None:
            args.out = tempfile.mkdtemp(prefix="pdserve-bench-smoke-")
        if args.model_dir == p.get_default("model_dir"):
            args.model_dir = os.path.join(args.out, "models")
    args.out = args.out or os.path.join(REPO_ROOT, "bench", "results")
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}: expected one of {', '.join(MODELS)}")
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}: expected one of {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    # Without a GPU the Triton kernels run in the interpreter; triton reads the switch at import time.
    if args.device == "cpu" or not _cuda_visible():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault(
        "TQDM_MININTERVAL", "10"
    )  # progress bars every 10 s, not 10 per second, in captured logs
    import torch

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    os.makedirs(args.out, exist_ok=True)
    results = device_results("engine", device, args.out, link=link_baselines, commit=args.commit)
    set_log_file(os.path.splitext(results.path)[0] + ".log")
    bench = Bench(
        args,
        device,
        "bfloat16" if is_cuda(device) else "float32",
        sizes_for(args),
        results,
        deadline=started + args.time_budget,
    )
    log(
        f"engine bench on {results.device_description}; torch {torch.__version__}; models {args.models}; "
        f"sections {sorted(args.sections)}; {'smoke' if args.smoke else 'quick' if args.quick else 'full'} "
        f"sizes; "
        f"results -> {results.path}"
    )
    measure_ceilings(bench)
    if args.sections & {"prefill", "decode", "throughput", "hf"}:
        for name in args.models:
            run_model(bench, name, args.sections)
    if "kernels" in args.sections:
        from bench import engine_kernels

        with section(bench, "kernels"):
            engine_kernels.run_kernels(bench)
    results.save()
    summarize(results.records)
    if not args.no_plot:
        try:
            plot_ratios(results.path)
        except Exception as exc:
            log(f"plot failed: {exc!r}")
    log(f"done in {time.perf_counter() - started:.1f} s: {len(results.records)} records in {results.path}")
    for failure in bench.failures:
        log(f"FAILED SECTION {failure}")
    return 1 if bench.failures else 0


def summarize(records: list[dict]) -> None:
    """One line per figure: value, floor, fraction of floor, transformers' figure and our speedup over it."""
    log("summary (value | ceiling | ratio to ceiling | transformers | speedup):")
    for r in records:
        if r["metric"].startswith("hf_") or r["value"] is None:
            continue
        p = r["params"]
        shape = " ".join(
            f"{k}={p[k]}" for k in ("model", "kernel", "case", "tokens", "batch", "context", "mode") if k in p
        )
        log(
            f"  {r['metric']:<20} {shape:<58} {fmt(r['value']):>9} {r['unit']:<6} | {fmt(r['ceiling']):>9} | "
            f"{fmt(r['ratio']):>7} | {fmt(r['baseline']):>9} | "
            f"{fmt(p.get('speedup_vs_hf', p.get('speedup_vs_ref')))}"
        )


def _cuda_visible() -> bool:
    import shutil

    return bool(shutil.which("nvidia-smi"))


if __name__ == "__main__":
    sys.exit(main())
