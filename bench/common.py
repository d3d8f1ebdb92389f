"""What every benchmark shares: progress logging, timing, the ceilings measured in the same run, result files
(plots: bench/plots.py).

- Timing: CUDA events around each call, after a device sync, so a figure is the call's wall time as the caller
  sees it (host work that enqueues kernels included); warmup calls first, then the median of N. On CPU:
  perf_counter.
- Ceilings: device copy bandwidth counts bytes read plus bytes written, as the device's datasheet-style
  figures do (H100 ~3.0 TB/s); matmul rate is a large square bf16 matmul (H100 ~790 TFLOP/s).
- Results: `<out>/<bench>-<device>-<YYYYMMDD>.json` in the format of docs/architecture.md, rewritten after
  every record so a crash loses nothing. A file already there is merged into (same metric and params: the
  newer record wins), so one benchmark can be split over several runs on the same day. `python bench/common.py
  merge A.json B.json -o C.json` merges files that came back from different machines' runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_KEYS = ("metric", "value", "unit", "ceiling", "ratio", "baseline", "params")

# --------------------------------------------------------------------------------------------------- logging

_T0 = time.perf_counter()
_LOG_FILE: str | None = None


def set_log_file(path: str | None) -> None:
    global _LOG_FILE
    _LOG_FILE = path


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - _T0:7.1f}s] {msg}"
    print(line, flush=True)
    if _LOG_FILE:
        try:
            with open(_LOG_FILE, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass


def elapsed() -> float:
    return time.perf_counter() - _T0


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


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def command_line() -> str:
    return " ".join(
        [
            os.path.relpath(sys.argv[0], REPO_ROOT)
            if sys.argv and os.path.isabs(sys.argv[0])
            else (sys.argv[0] if sys.argv else "")
        ]
        + sys.argv[1:]
    )


# Params that are measured or derived rather than chosen: not part of a record's identity.
VOLATILE_PARAMS = frozenset(
    {
        "n",
        "steps",
        "seconds",
        "min_ms",
        "max_ms",
        "new_tokens_run",
        "speedup_vs_hf",
        "hf_capped",
        "capped",
        "matches_ref",
        "skipped",
        "note",
        "max_abs_diff",
        "ref_max_abs",
    }
)


def record_key(record: dict) -> str:
    """What makes two records the same measurement, so a rerun replaces it: the metric and the params that
    were chosen (floats are taken for measurements, and the names in VOLATILE_PARAMS)."""
    p = record.get("params") or {}
    chosen = {k: v for k, v in p.items() if k not in VOLATILE_PARAMS and not isinstance(v, float)}
    return record["metric"] + "|" + json.dumps(chosen, sort_keys=True, default=str)


def make_record(metric: str, value, unit: str, ceiling=None, ratio=None, baseline=None, params=None) -> dict:
    return {
        "metric": metric,
        "value": value,
        "unit": unit,
        "ceiling": ceiling,
        "ratio": ratio,
        "baseline": baseline,
        "params": dict(params or {}),
    }


class Results:
    """The run's records; the JSON file is rewritten after every change.

    `link` (optional) is called with the record list before each write, to fill `baseline` fields from records
    that came later (the Hugging Face baseline runs after our engine has been freed)."""

    def __init__(
        self,
        bench: str,
        device,
        out_dir: str,
        link: Callable[[list[dict]], None] | None = None,
        commit: str | None = None,
        slug: str | None = None,
        description: str | None = None,
        filename: str | None = None,
    ):
        # slug/description: a device named by the caller (a remote server's, or GPUs seen without torch).
        self.bench, self.device_slug = bench, slug or device_slug(device)
        self.date = _dt.date.today().strftime("%Y%m%d")
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, filename or f"{bench}-{self.device_slug}-{self.date}.json")
        self.link = link
        self.commit = (
            commit or os.environ.get("PDSERVE_COMMIT") or git_commit()
        )  # a copy without .git: say it
        self.records: list[dict] = []
        self.commands: list[str] = []
        if os.path.exists(self.path):
            try:
                with open(self.path, encoding="utf-8") as f:
                    old = json.load(f)
                self.records = [r for r in old.get("records", []) if isinstance(r, dict) and "metric" in r]
                self.commands = [c for c in str(old.get("command", "")).split(" ; ") if c]
                log(f"merging into {self.path} ({len(self.records)} records already there)")
            except Exception as exc:  # a torn file from a killed run: keep it aside, start fresh
                log(f"could not read {self.path} ({exc}); moving it aside")
                os.replace(self.path, self.path + ".bad")
        self.commands.append(command_line())
        self.device_description = description or (self.device_slug if slug else device_name(device))

    def add(
        self,
        metric: str,
        value,
        unit: str,
        ceiling=None,
        ratio=None,
        baseline=None,
        params=None,
        quiet: bool = False,
    ) -> dict:
        rec = make_record(metric, value, unit, ceiling, ratio, baseline, params)
        key = record_key(rec)
        self.records = [r for r in self.records if record_key(r) != key] + [rec]
        if not quiet:
            log(
                f"  RESULT {metric} = {fmt(value)} {unit}  (ceiling {fmt(ceiling)}, ratio {fmt(ratio)}, "
                f"baseline {fmt(baseline)})  {json.dumps(rec['params'], default=str)}"
            )
        self.save()
        return rec

    def save(self) -> None:
        if self.link is not None:
            try:
                self.link(self.records)
            except Exception as exc:
                log(f"  (linking baselines failed: {exc!r})")
        doc = {
            "bench": self.bench,
            "device": self.device_slug,
            "date": self.date,
            "commit": self.commit,
            "command": " ; ".join(self.commands),
            "device_name": self.device_description,
            "records": self.records,
        }
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, self.path)


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def merge_files(paths: list[str], out: str, link: Callable[[list[dict]], None] | None = None) -> dict:
    """Union of the files' records (later files win on the same metric and params); commands joined."""
    merged: dict | None = None
    by_key: dict[str, dict] = {}
    commands: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        merged = merged or {k: v for k, v in doc.items() if k != "records"}
        commands += [c for c in str(doc.get("command", "")).split(" ; ") if c and c not in commands]
        for rec in doc.get("records", []):
            by_key[record_key(rec)] = rec
    assert merged is not None, "no input files"
    merged["command"] = " ; ".join(commands)
    merged["records"] = list(by_key.values())
    if link is not None:
        link(merged["records"])
    with open(out, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1, default=str)
        f.write("\n")
    return merged


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
        from bench.plots import plot_ratios

        plot_ratios(args.file)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
