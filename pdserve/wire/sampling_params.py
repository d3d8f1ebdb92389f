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
- Penalties as in vLLM: presence and frequency count output tokens only (OpenAI's meaning), repetition (> 1
  discourages) covers prompt and output tokens (transformers' RepetitionPenaltyLogitsProcessor).
- `logit_bias` maps token id -> bias in [-100, 100] (OpenAI's range), added to the logits before penalties.
- `bad_words` are strings; whoever holds the tokenizer (the proxy, the offline LLM) turns them into
  `bad_words_token_ids` (each word with and without a leading space, as vLLM does); the engine reads only
  the ids.
- `cache_salt` is not a sampling setting but travels here, with the request's other per-request options: it
  enters the first block's hash, so requests with different salts never share prefix-cache blocks.
- `structured` constrains the output to a grammar: one of {"json": schema}, {"json_object": true},
  {"regex": str}, {"choice": [str, ...]}, {"grammar": lark}; the node that samples masks the logits with it.
- `prompt_logprobs` k in [0, 20] (vLLM's meaning): the node that prefills returns, for every prompt token
  after the first, its logprob and rank plus the top k, from the logits at the position before it. -1 (the
  whole vocabulary, in vLLM) is refused: a vocabulary per prompt token would not fit the node wire.
- Wire version 2 added the fields above and version 3 `prompt_logprobs`; versions 1 and 2 (subsets) are still
  read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

GREEDY_TEMPERATURE = 1e-5  # below this a request is greedy
MAX_LOGPROBS = 20
WIRE_VERSION = 3
READ_WIRE_VERSIONS = (1, 2, 3)
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for each bias
MAX_PENALTY = 2.0  # OpenAI's range for presence / frequency penalties is [-2, 2]
MAX_CACHE_SALT = 1024  # characters, vLLM's limit
STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


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
    presence_penalty: float = 0.0  # [-2, 2]; subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # [-2, 2]; subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0; tokens in prompt or output: logit / p if > 0, else logit * p
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # never generated (as token sequences); see bad_words_token_ids
    bad_words_token_ids: list[list[int]] | None = None  # the bad words tokenized; the engine reads these
    cache_salt: str | None = None  # enters the first block's hash (not a sampling setting; see above)
    structured: dict | None = None  # one of STRUCTURED_KINDS -> its spec
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and rank plus the top k

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
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if _is_number(getattr(self, name)):
                setattr(self, name, float(getattr(self, name)))
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {
                (int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): v
                for k, v in self.logit_bias.items()
            }
        self.bad_words = list(self.bad_words) if self.bad_words else None
        self._validate()
        self._validate_extensions()
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
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            bad(
                f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, got "
                f"{self.prompt_logprobs!r}"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad(f"stop must be a non-empty string or a list of them, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                bad(f"stop_token_ids must be non-negative integers, got {t!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a boolean, got {getattr(self, name)!r}")

    def _validate_extensions(self) -> None:
        def bad(msg: str):
            raise ValueError(msg)

        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                bad(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
        rep = self.repetition_penalty
        if not _is_number(rep) or not math.isfinite(rep) or rep <= 0:
            bad(f"repetition_penalty must be a finite number > 0, got {rep!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias must map token ids to numbers")
            for k, v in self.logit_bias.items():
                if not _is_int(k) or k < 0:
                    bad(f"logit_bias keys must be token ids, got {k!r}")
                if not _is_number(v) or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
                    bad(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {v!r}")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, list) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
                bad("allowed_token_ids must be a non-empty list of token ids")
        if self.bad_words is not None and not all(isinstance(w, str) and w for w in self.bad_words):
            bad("bad_words must be a list of non-empty strings")
        if self.bad_words_token_ids is not None:
            seqs = self.bad_words_token_ids
            if not isinstance(seqs, list) or not all(
                isinstance(q, list) and q and all(_is_int(t) and t >= 0 for t in q) for q in seqs
            ):
                bad("bad_words_token_ids must be a list of non-empty lists of token ids")
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not 0 < len(self.cache_salt) <= MAX_CACHE_SALT
        ):
            bad(f"cache_salt must be a string of 1 to {MAX_CACHE_SALT} characters")
        if self.structured is not None:
            spec = self.structured
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in STRUCTURED_KINDS:
                bad(f"structured must map exactly one of {', '.join(STRUCTURED_KINDS)} to its spec")

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

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
        if version not in READ_WIRE_VERSIONS:
            raise ValueError(
                f"sampling params wire version {version!r} is not supported (expected {WIRE_VERSION})"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ValueError(f"unknown sampling params: {', '.join(map(str, unknown))}")
        return cls(**data)


def tokenize_bad_words(tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word as token ids, as vLLM forms them: the word alone, and the word after a space when that
    spelling starts with a different token and has as many tokens (a word-initial token of its own)."""
    out: list[list[int]] = []
    for word in words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not bare:
            continue
        out.append(bare)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            out.append(spaced)
    return out
