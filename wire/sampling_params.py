"""Per-request sampling parameters, shaped like vLLM's `SamplingParams`.

Torch-free: the proxy builds these from OpenAI requests, validates them before routing, and ships them to the
nodes with `to_dict()` (plain msgpack-able types); the nodes rebuild them with `from_dict()`, which validates
again, so a malformed or hostile wire message can never produce an out-of-range parameter on a node.

Decisions:
- Greedy when temperature < 1e-5 (0 included) or top_k == 1: dividing logits by a temperature that small
  overflows, and argmax is what such a request means.
- top_k 0 and -1 both mean "off" (OpenAI clients send -1, vLLM historically used -1); it is stored as 0.
- max_tokens None means "until the context is full" (the engine caps it by --max-model-len).
- logprobs k in [0, 20]: 0 returns only the sampled token's logprob, k > 0 also the top k (OpenAI's limit is
  20).
- `from_dict` rejects unknown keys: a node silently ignoring a sampling field a newer proxy sent would produce
  output the user did not ask for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

GREEDY_TEMPERATURE = 1e-5  # below this a request is greedy
MAX_LOGPROBS = 20
WIRE_VERSION = 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    seed: int | None = None
    stop: list[str] | str | None = None  # normalised to list[str]
    stop_token_ids: list[int] | None = None  # normalised to list[int]
    max_tokens: int | None = 16
    min_tokens: int = 0  # EOS and stop_token_ids are blocked until this many tokens exist
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's plus the top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        if _is_number(self.temperature):
            self.temperature = float(self.temperature)
        if _is_number(self.top_p):
            self.top_p = float(self.top_p)
        if _is_number(self.min_p):
            self.min_p = float(self.min_p)
        self._validate()
        if self.top_k == -1:
            self.top_k = 0

    def _validate(self) -> None:
        def bad(msg: str):
            raise ValueError(msg)

        if not _is_int(self.n) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad(f"top_k must be an integer >= 1, or 0 / -1 to disable it, got {self.top_k!r}")
        if not _is_number(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad(f"max_tokens must be an integer >= 1 (or None), got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad(f"stop must be a non-empty string or a list of them, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                bad(f"stop_token_ids must be non-negative integers, got {t!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a boolean, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Stop ids only; the engine adds the checkpoint's EOS ids unless ignore_eos."""
        return set(self.stop_token_ids)

    def clone(self, **changes) -> "SamplingParams":
        data = self.to_dict()
        data.pop("version")
        data.update(changes)
        return SamplingParams(**data)

    def to_dict(self) -> dict:
        """Plain types only (msgpack-able), with the wire version."""
        data = asdict(self)
        data["version"] = WIRE_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        if not isinstance(data, dict):
            raise ValueError(f"sampling params must be a map, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", WIRE_VERSION)
        if version != WIRE_VERSION:
            raise ValueError(
                f"sampling params wire version {version!r} is not supported (expected {WIRE_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"unknown sampling params: {', '.join(map(str, unknown))}")
        return cls(**data)
