"""What `LLM.generate` and the servers hand back, shaped like vLLM's `RequestOutput` / `CompletionOutput`.

Torch-free (plain Python values only), so the proxy can build the same objects from wire messages.
Logprobs are a list with one entry per generated token; each entry maps token id -> `Logprob` and always holds
the sampled token (with its rank) plus the top-k tokens asked for. Prompt logprobs have the same entries, one
per prompt token (the prompt's own token in place of the sampled one), and None for the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely token under the raw distribution
    decoded_token: str | None = None


SampleLogprobs = list[dict[int, Logprob]]  # one dict per generated token
PromptLogprobs = list[dict[int, Logprob] | None]  # one per prompt token; the first is None (vLLM's shape)


def make_logprob_entry(
    sampled_id: int,
    sampled_logprob: float,
    sampled_rank: int,
    topk_ids: Sequence[int],
    topk_logprobs: Sequence[float],
    num_logprobs: int,
) -> dict[int, Logprob]:
    """One generated token's entry: the sampled token first, then the row's first `num_logprobs` top entries
    (ranked 1..k). A sampled token that is also in the top k appears once, under its own rank."""
    entry = {int(sampled_id): Logprob(float(sampled_logprob), int(sampled_rank))}
    for rank, (tid, lp) in enumerate(
        zip(topk_ids[:num_logprobs], topk_logprobs[:num_logprobs], strict=False), start=1
    ):
        entry.setdefault(int(tid), Logprob(float(lp), rank))
    return entry


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, when logprobs were asked
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = (
        None  # the stop string or stop token id that ended it; None for EOS/length
    )

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (local or transferred)
    prompt_logprobs: PromptLogprobs | None = None  # when SamplingParams.prompt_logprobs was set
