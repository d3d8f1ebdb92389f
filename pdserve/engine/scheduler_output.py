"""What one scheduler step hands the model runner, and the scheduler's gauges for /metrics.

The runner flattens the step's tokens in the order of `SchedulerOutput.scheduled`: decodes first (one token
each), then prefill chunks, matching `engine/attention_metadata.py`. For each entry it writes K/V for
positions [num_computed_tokens, num_computed_tokens + num_new_tokens) into the slots of `block_ids`, and
samples one token from the chunk's last row when `samples` is True. It returns `{request_id: token_id}` for
exactly those entries to `Scheduler.update_from_output`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request_id: str
    token_ids: list[int]  # [num_new_tokens] the tokens to compute: all_token_ids[num_computed_tokens:][:n]
    num_computed_tokens: int  # tokens already in the KV cache before this step (prefix hits included)
    #                           == position of token_ids[0]
    block_ids: list[int]  # the request's whole block table; covers num_computed_tokens + num_new_tokens slots
    is_decode: bool  # one new token right after the request's last sampled one
    samples: bool  # this chunk completes the request's tokens: sample one token from its last row

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length including this step's tokens (what attention reads)."""
        return self.num_computed_tokens + len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # decodes first, then prefills
    num_decodes: int = 0  # scheduled[:num_decodes] are decodes
    num_scheduled_tokens: int = 0  # T, the flat batch's length: sum of num_new_tokens
    # Requests preempted during this step (their blocks are gone; drop any per-request state and cached rows).
    preempted_request_ids: list[str] = field(default_factory=list)
    # Requests that finished or were aborted since the previous step (drop per-request runner state).
    finished_request_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def decodes(self) -> list[ScheduledRequest]:
        return self.scheduled[: self.num_decodes]

    @property
    def prefills(self) -> list[ScheduledRequest]:
        return self.scheduled[self.num_decodes :]


@dataclass(slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # used blocks / all blocks
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    num_preemptions: int  # since start
