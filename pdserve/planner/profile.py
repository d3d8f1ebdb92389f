"""A node's measured performance profile, as `pdserve profile` writes it and `pdserve plan` reads it.

    {
      "schema": 1, "model": ..., "device": ..., "date": ..., "tensor_parallel_size": 1,
      "kv_cache_tokens": 123456,          # tokens the node's KV cache holds
      "max_num_batched_tokens": 2048,     # the prefill chunk a colocated node's mixed steps take
      "prefill": [{"input_len": 512, "ms": 24.3}, ...],           # one prompt alone, every chunk
      "decode": [{"batch": 8, "context": 1024, "itl_ms": 5.1}, ...]  # one step of `batch` running requests
    }

Between measured points the planner interpolates linearly (prefill time in the input length; step time in
the batch, then in the context); below the first point it takes the first, beyond the last it extrapolates
from the last two (never below the last), so a profile of a few points still answers every question the
planner asks. Profiles must hold positive times. Torch-free: the proxy may read it.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass

from pdserve.wire.errors import ConfigError

SCHEMA = 1


@dataclass(frozen=True)
class Profile:
    model: str
    device: str
    kv_cache_tokens: int
    max_num_batched_tokens: int
    prefill: tuple[tuple[int, float], ...]  # (input_len, ms), sorted
    decode: dict[int, tuple[tuple[int, float], ...]]  # context -> ((batch, itl_ms), ...), sorted
    tensor_parallel_size: int = 1

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        try:
            if d.get("schema") != SCHEMA:
                raise ConfigError(f"profile schema {d.get('schema')!r}, this pdserve reads {SCHEMA}")
            prefill = tuple(sorted((int(p["input_len"]), float(p["ms"])) for p in d["prefill"]))
            decode: dict[int, list[tuple[int, float]]] = {}
            for p in d["decode"]:
                decode.setdefault(int(p["context"]), []).append((int(p["batch"]), float(p["itl_ms"])))
            profile = cls(
                model=str(d.get("model", "")),
                device=str(d.get("device", "")),
                kv_cache_tokens=int(d["kv_cache_tokens"]),
                max_num_batched_tokens=int(d["max_num_batched_tokens"]),
                prefill=prefill,
                decode={c: tuple(sorted(points)) for c, points in sorted(decode.items())},
                tensor_parallel_size=int(d.get("tensor_parallel_size", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a pdserve profile: {exc!r}") from None
        if not profile.prefill or not profile.decode:
            raise ConfigError("a profile needs at least one prefill and one decode point")
        times = [ms for _, ms in profile.prefill] + [ms for pts in profile.decode.values() for _, ms in pts]
        if min(times) <= 0:
            raise ConfigError("a profile's times must be positive")
        return profile

    @classmethod
    def load(cls, path: str) -> "Profile":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except OSError as exc:
            raise ConfigError(f"cannot read the profile {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"the profile {path} is not JSON: {exc}") from None

    def prefill_ms(self, input_len: float) -> float:
        """One prompt of input_len tokens, alone on the node."""
        return max(_interpolate(self.prefill, input_len), 0.0)

    def itl_ms(self, batch: float, context: float) -> float:
        """One decode step with `batch` running requests of `context` tokens each."""
        contexts = list(self.decode)
        by_context = [(c, _interpolate(self.decode[c], batch)) for c in contexts]
        return max(_interpolate(tuple(by_context), context), 0.0)


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Piecewise linear through sorted (x, y) points. Below the first point, the first y (a time never shrinks
    below the smallest measured case); above the last, extrapolated from the last two but never below the
    last y; one point is a constant."""
    xs = [p[0] for p in points]
    if len(points) == 1 or x <= xs[0]:
        return points[0][1]
    i = min(bisect.bisect_left(xs, x), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1
    return max(y, y1) if x > xs[-1] else y
