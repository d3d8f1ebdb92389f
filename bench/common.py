"""What the GPU benchmarks share beyond pdserve.benchmarks.results (progress logging, result files): devices,
timing, the ceilings measured in the same run (plots: pdserve/benchmarks/plots.py).

- Timing: CUDA events around each call, after a device sync, so a figure is the call's wall time as the caller
  sees it (host work that enqueues kernels included); warmup calls first, then the median of N. On CPU:
  perf_counter.
- Ceilings: device copy bandwidth counts bytes read plus bytes written, as the device's datasheet-style
  figures do (H100 ~3.0 TB/s); matmul rate is a large square bf16 matmul (H100 ~790 TFLOP/s).
- Results: `device_results` names the file after the device measured on. `python bench/common.py merge A.json
  B.json -o C.json` merges files that came back from different machines' runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Callable

from pdserve.benchmarks.results import Results, log, merge_files

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------- devices


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def sync(device) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def device_slug(device) -> str:
    """'h100', 'h200', 'a100', ... from the CUDA device name; 'cpu' otherwise."""
    if not is_cuda(device):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(device).lower()
    for token in name.replace("-", " ").split():
        if token[:1] in "habvl" and token[1:].isdigit():
            return token
    return "".join(c for c in name if c.isalnum())[:24] or "cuda"


def device_name(device) -> str:
    if not is_cuda(device):
        import platform

        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import torch

    props = torch.cuda.get_device_properties(device)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"


def free_memory(device=None) -> None:
    """Drop what Python no longer references and hand cached CUDA blocks back, so the next model fits."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:
        pass


@contextmanager
def guarded(name: str, failures: list, device=None):
    """Run a block of a benchmark; an exception is logged with its traceback and noted in `failures`, and the
    run goes on with the next block (CUDA memory freed either way)."""
    started = time.perf_counter()
    log(f"=== {name} ({gpu_memory_gib(device) if device is not None else ''})")
    try:
        yield
    except Exception as exc:
        failures.append(f"{name}: {exc!r}")
        log(f"!!! {name} FAILED: {exc!r}")
        for line in traceback.format_exc().rstrip().splitlines():
            log("    " + line)
    finally:
        free_memory(device)
        log(f"=== {name} finished in {time.perf_counter() - started:.1f} s")


def gpu_memory_gib(device) -> str:
    if not is_cuda(device):
        return "n/a"
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return f"{(total - free) / 2**30:.1f}/{total / 2**30:.1f} GiB used"


# --------------------------------------------------------------------------------------------------- timing


def time_fn(
    fn: Callable[[], object], device, warmup: int = 3, iters: int = 10, max_seconds: float | None = None
) -> dict:
    """Median (and min, max) milliseconds of `fn()`; each call timed alone after a device sync.

    max_seconds bounds the measured loop (at least 3 timed calls, or all of them if fewer were asked)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    started = time.perf_counter()
    if is_cuda(device):
        import torch

        stream = torch.cuda.current_stream(device)
        for i in range(iters):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            begin.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(begin.elapsed_time(end))
            if (
                max_seconds is not None
                and i + 1 >= min(3, iters)
                and time.perf_counter() - started > max_seconds
            ):
                break
    else:
        for i in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
            if (
                max_seconds is not None
                and i + 1 >= min(3, iters)
                and time.perf_counter() - started > max_seconds
            ):
                break
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "n": len(times),
    }


# --------------------------------------------------------------------------------------------------- ceilings


def capture_graph(fn: Callable[[], object], device=None):
    """fn() run once on a side stream (Triton compiles, cuBLAS settles its kernels), then captured in a CUDA
    graph."""
    import torch

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def device_ms(fn: Callable[[], object], calls: int) -> float:
    """Device milliseconds per fn() over `calls` calls issued back to back (no sync between them)."""
    import torch

    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / calls


def measure_copy_bandwidth(device, nbytes: int | None = None) -> float:
    """Device-to-device copy, bytes/s with read and write both counted (1 GiB on a GPU)."""
    import torch

    nbytes = nbytes or ((1 << 30) if is_cuda(device) else (64 << 20))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=5, iters=20)
    return 2 * nbytes / (t["median_ms"] / 1e3)


def measure_matmul_rate(device, n: int | None = None, dtype=None) -> float:
    """FLOP/s of a square matmul (8192^3 bf16 on a GPU; 512^3 fp32 on CPU)."""
    import torch

    if is_cuda(device):
        n, dtype = n or 8192, dtype or torch.bfloat16
    else:
        n, dtype = n or 512, dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: torch.matmul(a, b, out=out), device, warmup=10 if is_cuda(device) else 2, iters=30)
    return 2 * n**3 / (t["median_ms"] / 1e3)


# --------------------------------------------------------------------------------------------------- results


def device_results(bench: str, device, out_dir: str, **kwargs) -> Results:
    """A results file named after the device this process measures on."""
    return Results(bench, out_dir, slug=device_slug(device), description=device_name(device), **kwargs)


def _main() -> int:
    parser = argparse.ArgumentParser(description="bench result files: merge, plot")
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+")
    m.add_argument("-o", "--out", required=True)
    p = sub.add_parser("plot")
    p.add_argument("file")
    args = parser.parse_args()
    if args.cmd == "merge":
        link = None
        try:
            sys.path.insert(0, REPO_ROOT)
            from bench.engine_floors import link_baselines as link
        except Exception:
            pass
        doc = merge_files(args.files, args.out, link)
        print(f"{args.out}: {len(doc['records'])} records")
    else:
        from pdserve.benchmarks.plots import plot_ratios

        plot_ratios(args.file)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
