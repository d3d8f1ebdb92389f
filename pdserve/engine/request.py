"""One generation request as the scheduler sees it: its tokens, how far its KV is computed, and its block
hashes.

Torch-free. The scheduler owns a Request's lifecycle (WAITING -> RUNNING <-> PREEMPTED -> FINISHED_*); the KV
cache manager owns its blocks. Token bookkeeping follows one rule everywhere: `num_computed_tokens` counts
tokens whose K/V is in the cache, so a request needs `num_tokens - num_computed_tokens` more tokens computed,
and it samples a new token exactly when a step brings `num_computed_tokens` up to `num_tokens`. The same rule
covers a prompt's chunks, a decode (one token outstanding) and a recompute after preemption (prompt and
outputs outstanding).

Block hashes are chained over prompt and output tokens alike (`wire.hashing.hash_block`) and computed
incrementally as each block of `block_size` tokens fills, so a preempted request can hit its own output
blocks. A request's `cache_salt` (read from its sampling params) enters the first block's hash only, as in
vLLM and as `wire.hashing.hash_prompt_blocks(..., cache_salt=...)` computes it for the proxy's index.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from pdserve.wire.hashing import BlockHash, hash_block


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # back in the waiting queue after its blocks were taken; recomputes from scratch
    WAITING_FOR_REMOTE_KVS = (
        3  # blocks held while a prefill node writes the prompt's KV into them (decode node)
    )
    # Every status from here on is final; order matters for is_finished().
    FINISHED_STOPPED = 4  # eos, a stop token id, or a stop string (reported by the detokenizer)
    FINISHED_LENGTH = 5  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 6  # client went away, timeout, or a failure elsewhere

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason string for a final status, None otherwise."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}
STATUS_BY_REASON = {reason: status for status, reason in _FINISH_REASONS.items()}


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: (
        Any  # opaque here; read: max_tokens, ignore_eos, stop_token_ids, min_tokens (all optional)
    )
    arrival_time: float = field(default_factory=time.monotonic)
    block_size: int | None = None  # None: the scheduler sets the KV cache's on add; else it must match
    extra_keys: tuple = ()  # folded into every block hash (e.g. a LoRA name or cache salt)

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    # Prefix-cache hit tokens at its FIRST scheduling (usage.prompt_tokens_details.cached_tokens); -1 until
    # then.
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that finished it
    block_hashes: list[BlockHash] = field(default_factory=list)  # one per full block of all_token_ids
    # sampling_params.prompt_logprobs set: one record per prompt position, filled chunk by chunk
    # (engine/prompt_logprobs.py), handed out with the first token; done once handed out (or when another
    # node prefills), after which the request reads the prefix cache like any other.
    prompt_logprobs: list | None = None
    prompt_logprobs_done: bool = False
    # prompt + outputs kept as one list so slicing a step's tokens never concatenates.
    _all_token_ids: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self._all_token_ids = self.prompt_token_ids + list(self.output_token_ids)
        self._hash_full_blocks()

    # ---- tokens --------------------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def all_token_ids(self) -> Sequence[int]:
        """Prompt then outputs. A live view: do not mutate, copy if kept across steps."""
        return self._all_token_ids

    @property
    def max_tokens(self) -> int | None:
        return getattr(self.sampling_params, "max_tokens", None)

    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are still to compute here: every prompt position must run through the model,
        so the scheduler gives it no prefix-cache hits (vLLM does the same)."""
        asked = getattr(self.sampling_params, "prompt_logprobs", None) is not None
        return asked and not self.prompt_logprobs_done

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        self._hash_full_blocks()

    # ---- hashes --------------------------------------------------------------------------------------------
    def set_block_size(self, block_size: int) -> None:
        """Adopt the KV cache's block size (once, before scheduling) and hash the blocks filled so far."""
        if self.block_size is not None and self.block_size != block_size:
            raise ValueError(
                f"request {self.request_id} hashes blocks of {self.block_size}, cache uses {block_size}"
            )
        self.block_size = block_size
        self._hash_full_blocks()

    def _hash_full_blocks(self) -> None:
        """Hash every block that has filled since the last call (at most one per appended token)."""
        size, tokens, hashes = self.block_size, self._all_token_ids, self.block_hashes
        if size is None:
            return
        while (len(hashes) + 1) * size <= len(tokens):
            start = len(hashes) * size
            parent = hashes[-1] if hashes else None
            extra = self.extra_keys if hashes else self._first_block_keys()
            hashes.append(hash_block(parent, tokens[start : start + size], extra))

    def _first_block_keys(self) -> tuple:
        """The first block also carries the request's cache_salt (the chain makes every later hash differ)."""
        salt = getattr(self.sampling_params, "cache_salt", None)
        return self.extra_keys + (salt,) if salt else self.extra_keys
