"""Compile every Triton kernel for Hopper (sm_90) with the launch configuration its wrapper picks on a GPU,
without a GPU: the interpreter runs kernels but never compiles them, and some mistakes (loop-carried type
changes, dot shape limits, constexpr misuse) only show in the compiler. Run as a script with TRITON_INTERPRET
unset; it calls each wrapper on CPU tensors of real shapes, catches the launch, and compiles it instead. Exits
non-zero on any failure."""

from __future__ import annotations

import os
import sys
import traceback

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run with TRITON_INTERPRET unset"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pdserve.kernels import (  # noqa: E402
    block_copy,
    decode_attention,
    fused_moe,
    kv_cache_write,
    prefill_attention,
    rms_norm,
    rotary,
    silu_and_mul,  # noqa: E402
)

TARGET = GPUTarget("cuda", 90, 32)
_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.uint8: "u8",
}
_OPTIONS = ("num_warps", "num_stages")
compiled: list[str] = []


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


class _Compiler:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` compiles instead of launching."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
            names = self.fn.arg_names
            values = dict(zip(names, args, strict=False), **kwargs)
            consts = {n: v for n, v in values.items() if n in self.fn.constexprs_names}
            signature = {n: "constexpr" if n in consts else _arg_type(values[n]) for n in names}
            src = ASTSource(self.fn, signature, constexprs={(names.index(n),): v for n, v in consts.items()})
            triton.compile(src, target=TARGET, options=options)
            compiled.append(f"{self.fn.__name__} {consts} {options}")

        return launch


def _patch_kernels() -> None:
    for module in (
        block_copy,
        decode_attention,
        fused_moe,
        kv_cache_write,
        prefill_attention,
        rms_norm,
        rotary,
        silu_and_mul,
    ):
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                value.constexprs_names = {value.arg_names[i] for i in value.constexprs}
                setattr(module, name, _Compiler(value))


def _cases():
    bf = torch.bfloat16
    for hq, hk, d in ((32, 8, 128), (14, 2, 64)):
        hidden = hq * d
        yield lambda: rms_norm.rms_norm(torch.zeros(3, hidden, dtype=bf), torch.zeros(hidden, dtype=bf), 1e-5)
        yield lambda: rms_norm.rms_norm(
            torch.zeros(3, hidden, dtype=bf),
            torch.zeros(hidden, dtype=bf),
            1e-5,
            torch.zeros(3, hidden, dtype=bf),
        )
        # Gemma's norm: a float32 (1 + w) weight on bf16 activations, multiplied before the rounding
        yield lambda: rms_norm.rms_norm(
            torch.zeros(3, hidden, dtype=bf), torch.zeros(hidden), 1e-6, torch.zeros(3, hidden, dtype=bf)
        )
        yield lambda: silu_and_mul.silu_and_mul(torch.zeros(3, 2 * 4864, dtype=bf))
        qkv = torch.zeros(5, hq + 2 * hk, d, dtype=bf)
        q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
        pos, cs = torch.zeros(5, dtype=torch.long), torch.zeros(64, d)
        cache = torch.zeros(2, 4, 16, hk, d, dtype=bf)
        slots = torch.zeros(5, dtype=torch.long)
        yield lambda: rotary.apply_rotary(pos, q, k, cs)
        yield lambda: rotary.apply_rotary_and_write_kv(pos, q, k, v, cache[0], cache[1], slots, cs)
        yield lambda: kv_cache_write.write_kv_cache(k, v, cache[0], cache[1], slots)
        three = torch.zeros(3, dtype=torch.long)
        yield lambda: block_copy.gather_blocks(cache, three)
        yield lambda: block_copy.scatter_blocks(torch.zeros(2, 3, 16, hk, d, dtype=bf), three, cache)
        tables = torch.zeros(3, 128, dtype=torch.int32)
        lens = torch.full((3,), 100, dtype=torch.int32)
        for dtype in (bf, torch.float32):
            kc = torch.zeros(4, 16, hk, d, dtype=dtype)
            for opts in ({}, {"sliding_window": 4096, "softcap": 50.0}):  # Gemma 2's local layers
                for tokens in (3, 3 * 700):
                    cu = torch.zeros(4, dtype=torch.int32)
                    yield lambda: prefill_attention.paged_prefill_attention(
                        torch.zeros(tokens, hq, d, dtype=dtype), kc, kc, tables, cu, lens, 0.1, **opts
                    )
                for batch in (1, 3):  # split-K with a reduce, and one partition written directly
                    yield lambda: decode_attention.paged_decode_attention(
                        torch.zeros(batch, hq, d, dtype=dtype),
                        kc,
                        kc,
                        tables[:batch],
                        lens[:batch],
                        0.1,
                        **opts,
                    )
    # Qwen3-30B-A3B's and Mixtral-8x7B's experts, at decode (1 token) and prefill sizes
    for experts, top_k, hidden, inter in ((128, 8, 2048, 768), (8, 2, 4096, 14336)):
        for dtype in (bf, torch.float32):
            w13 = torch.zeros(experts, 2 * inter, hidden, dtype=dtype)
            w2 = torch.zeros(experts, hidden, inter, dtype=dtype)
            for tokens in (1, 700):
                ids = torch.arange(tokens * top_k).remainder(experts).view(tokens, top_k)
                weights = torch.zeros(tokens, top_k, dtype=torch.float32)
                yield lambda: fused_moe.fused_moe(
                    torch.zeros(tokens, hidden, dtype=dtype), w13, w2, weights, ids
                )


def main() -> int:
    _patch_kernels()
    failures = 0
    for case in _cases():
        try:
            case()
        except Exception:  # report every failure, not just the first
            failures += 1
            traceback.print_exc()
    print(f"compiled {len(compiled)} kernel launches for sm_90, {failures} failures")
    for line in compiled:
        print("  ", line)
    return 1 if failures or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
