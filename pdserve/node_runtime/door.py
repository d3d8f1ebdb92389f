"""The checks every request meets at a node's door, before the engine loop sees it: the sampling params
parse (SamplingParams.from_dict validates: a proxy is not trusted to have checked), every token id indexes the
vocabulary, logprob widths are within --max-logprobs, and the waiting queue has room. Cheap, on the RPC
thread; a grammar is compiled only when the engine takes the request."""

from __future__ import annotations

from pdserve.wire.sampling_params import SamplingParams


class Refused(Exception):
    def __init__(self, status: int, message: str, retryable: bool = False):
        super().__init__(message)
        self.status, self.retryable = status, retryable


def check_at_door(node, params: dict, prompt_token_ids: list[int]) -> SamplingParams:
    """The request's SamplingParams, or Refused with the status to answer."""
    try:
        parsed = SamplingParams.from_dict(params)
    except (ValueError, TypeError) as exc:
        raise Refused(400, f"bad sampling params: {exc}") from None
    try:
        node.core.check_token_ids(prompt_token_ids, parsed)
    except ValueError as exc:
        raise Refused(400, str(exc)) from None
    limit = node.options.max_logprobs
    for name in ("logprobs", "prompt_logprobs"):
        asked = getattr(parsed, name)
        if asked is not None and asked > limit:
            raise Refused(400, f"{name} {asked} is more than this node's --max-logprobs {limit}")
    if node.loop.snapshot.num_waiting >= node.options.max_num_waiting:
        raise Refused(429, f"node {node.node_id}'s queue is full", retryable=True)
    return parsed
