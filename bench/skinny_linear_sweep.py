"""Which tiles make kernels/skinny_linear.py fastest, against cuBLAS (F.linear), at decode shapes (GPU only).

Llama-3.1-8B and Qwen2.5-0.5B projection shapes, 1 and 8 rows, weights rotated over copies past L2 (a model
never reads one weight twice in a step), every call timed inside a CUDA graph (decode replays these kernels in
graphs), each printed beside the device-copy bandwidth measured in the same run. Each tile config's output is
compared with cuBLAS's. Prints a table; the chosen config is then written into `skinny_linear._blocks` by
hand.

  python bench/skinny_linear_sweep.py | gzip -9n > bench/results/logs/skinny_linear-<device>-<YYYYMMDD>.log.gz
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pdserve.kernels.skinny_linear as sk  # noqa: E402
from bench.common import capture_graph, device_ms  # noqa: E402

SHAPES = {
    "llama qkv": (6144, 4096),
    "llama o": (4096, 4096),
    "llama gate_up": (28672, 4096),
    "llama down": (4096, 14336),
    "llama lm_head": (128256, 4096),
    "qwen qkv": (1152, 896),
    "qwen o": (896, 896),
    "qwen gate_up": (9728, 896),
    "qwen down": (896, 4864),
}
CONFIGS = [(bn, bk, w, s) for bn in (8, 16, 32) for bk in (256, 512) for w in (4, 8) for s in (3, 4)]


def graph_us(fn, calls: int) -> float:
    """Microseconds per call of fn() (which makes `calls` calls), captured in a CUDA graph, 10 replays."""
    graph = capture_graph(fn)
    graph.replay()
    return device_ms(graph.replay, 10) / calls * 1e3


def copy_gbps() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / graph_us(lambda: dst.copy_(src), 1) / 1e3


def main() -> None:
    print(
        f"{torch.cuda.get_device_name()}; torch {torch.__version__}; device copy {copy_gbps():.0f} GB/s "
        f"(read + write counted); columns: time per call and weight bytes / time"
    )
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, min(16, -(-120_000_000 // nbytes)))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        for rows in (1, 8):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x, weights[0])
            cublas = graph_us(lambda x=x, ws=weights: [F.linear(x, w) for w in ws], copies)
            results = []
            for config in CONFIGS:
                sk._blocks = lambda n_, k_, c=config: c
                err = (sk.skinny_linear(x, weights[0]).float() - want.float()).abs().max().item()
                results.append(
                    (
                        graph_us(lambda x=x, ws=weights: [sk.skinny_linear(x, w) for w in ws], copies),
                        config,
                        err,
                    )
                )
            best = min(results)
            chosen = next(r for r in results if r[1] == (32, 512, 4, 3))
            print(
                f"{name:14s} M={rows} N={n:6d} K={k:5d}: cublas {cublas:7.2f} us "
                f"({nbytes / cublas / 1e3:5.0f} GB/s)"
                f" | best {best[0]:7.2f} us ({nbytes / best[0] / 1e3:5.0f} GB/s) {best[1]}"
                f" | chosen (32, 512, 4, 3) {chosen[0]:7.2f} us, max |diff| vs cublas {chosen[2]:.3g}",
                flush=True,
            )
        del weights


if __name__ == "__main__":
    main()
