"""Prompt logprobs (vLLM's `prompt_logprobs`): for each prompt token i >= 1, the log_softmax of the logits at
position i - 1, read at token i, with that token's rank and the request's top k; token 0 has none.

They are computed where the prompt is prefilled, chunk by chunk: a chunk covering positions [s, e) yields the
records of tokens s + 1 .. e (capped at the prompt's end, whose logits sample the first token instead). The
step's hidden states are there already; only the rows of requests that ask go through lm_head again (the
runner otherwise projects each chunk's last row only). They go through lm_head + log_softmax in pieces of at
most PIECE_ELEMENTS logits, so memory is bounded by one piece, not by prompt length x vocabulary.

Every position must run through the model, so such a request gets no prefix-cache hits until its records are
handed out (Request.wants_prompt_logprobs; the scheduler asks). A preempted one recomputes from position 0 and
overwrites its records. Records travel like generated tokens' logprob rows: [top_ids, top_logprobs, logprob,
rank], the top list cut to the request's own k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from pdserve.engine.request import Request
from pdserve.engine.scheduler_output import SchedulerOutput

PIECE_ELEMENTS = 1 << 24  # logits per piece: 64 MiB of float32, small beside a prefill's activations


@dataclass(slots=True)
class PromptRows:
    """The rows of one step's flat batch whose prompt-logprob records are due, and (after compute) those
    records."""

    rows: list[int] = field(default_factory=list)  # flat batch row (index into the step's hidden states)
    targets: list[int] = field(default_factory=list)  # the prompt token each row's logits are read at
    owners: list[tuple[Request, int]] = field(default_factory=list)  # (request, the record's prompt position)
    widths: list[int] = field(default_factory=list)  # the request's k
    records: list[list] = field(default_factory=list)  # per row, after compute

    def compute(
        self, hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor], vocab_size: int
    ) -> None:
        """hidden [T, H] from the step's forward; compute_logits(hidden rows) -> float32 logits [n, V]."""
        device = hidden.device
        rows = torch.as_tensor(self.rows, dtype=torch.long, device=device)
        targets = torch.as_tensor(self.targets, dtype=torch.long, device=device)
        k = min(max(self.widths), vocab_size)
        step = max(1, PIECE_ELEMENTS // vocab_size)
        out: list = []
        for start in range(0, len(self.rows), step):
            end = min(start + step, len(self.rows))
            logprobs = torch.log_softmax(compute_logits(hidden[rows[start:end]]), dim=-1)
            token = logprobs.gather(1, targets[start:end, None])
            ranks = (logprobs > token).sum(dim=-1) + 1  # as the sampler ranks: 1 + strictly more likely
            top_values, top_ids = logprobs.topk(k, dim=-1)
            out.extend(
                zip(top_ids.tolist(), top_values.tolist(), token[:, 0].tolist(), ranks.tolist(), strict=True)
            )
            del logprobs
        self.records = [
            [ids[:width], values[:width], logprob, rank]
            for (ids, values, logprob, rank), width in zip(out, self.widths, strict=True)
        ]

    def store(self) -> None:
        """Each record into its request, at its prompt position."""
        for (request, position), record in zip(self.owners, self.records, strict=True):
            if request.prompt_logprobs is None:
                request.prompt_logprobs = [None] * request.num_prompt_tokens
            request.prompt_logprobs[position] = record


def plan_rows(plan: SchedulerOutput, pending: set[str], get_request) -> PromptRows | None:
    """The step's rows for requests in `pending` (those still wanting prompt logprobs); None when there are
    none, so a step without such requests builds nothing. Decodes come first in the flat batch and never hold
    prompt positions (a request's first token ends its prompt logprobs)."""
    found = PromptRows()
    offset = sum(item.num_new_tokens for item in plan.decodes)
    for item in plan.prefills:
        request = get_request(item.request_id) if item.request_id in pending else None
        if request is not None and request.wants_prompt_logprobs:
            prompt = request.prompt_token_ids
            start = item.num_computed_tokens
            k = request.sampling_params.prompt_logprobs
            for position in range(start, min(start + item.num_new_tokens, len(prompt) - 1)):
                found.rows.append(offset + position - start)
                found.targets.append(prompt[position + 1])
                found.owners.append((request, position + 1))
                found.widths.append(k)
        offset += item.num_new_tokens
    return found if found.rows else None


def take(request: Request) -> list:
    """The request's records, handed out with its first token (position 0 is None); afterwards it no longer
    wants any, and reads the prefix cache again if it is ever recomputed."""
    records = request.prompt_logprobs or [None] * request.num_prompt_tokens
    request.prompt_logprobs = None
    request.prompt_logprobs_done = True
    return records
