"""Sampler: one pass over a batch of logits rows, each with its own SamplingParams.

Steps, per row: block tokens (min_tokens), the caller's logits processors (penalties, logit_bias, bad
words, allowed tokens, grammars: engine/logits_processors.py), then greedy rows take the argmax; the others
divide by temperature, keep the top_k, then the top_p nucleus, then tokens with p >= min_p * p_max, and draw
from what is left.

Decisions:
- The draw is an exponential race: token = argmax(p_i / E_i) with E_i ~ Exp(1), which picks token i with
  probability p_i. A seeded row draws its E from its own torch.Generator, exactly V numbers per step, so its
  tokens depend only on its seed and its logits, never on its batch neighbours; unseeded rows share one
  batch-wide draw. Only the exponential draw loops over seeded rows; filtering and the race are vectorised
  over the batch.
- Logprobs come from the raw logits' log_softmax (vLLM's default: before temperature and filtering), top-k
  sorted descending; the sampled token's logprob and 1-based rank (1 + number of tokens strictly more likely)
  are always included.
- Filtering happens in descending-sorted order (one sort per step, only when a row uses top_k or top_p), so
  ties at the top_k boundary keep exactly k tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from pdserve.wire.sampling_params import SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A request's own generator (None when it has no seed). Seeds are taken modulo 2**64, so negatives
    work."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed % (1 << 64))
    return gen


@dataclass(slots=True)
class SamplerLogprobs:
    topk_ids: torch.Tensor  # [n, k] int64, descending by logprob; k = the batch's largest request (may be 0)
    topk_logprobs: torch.Tensor  # [n, k] float32
    sampled_logprobs: torch.Tensor  # [n] float32, logprob of the token each row sampled
    sampled_ranks: torch.Tensor  # [n] int64, 1-based rank of that token

    def tolists(self) -> tuple[list[list[int]], list[list[float]], list[float], list[int]]:
        """Host lists for the wire / for outputs.make_logprob_entry (one device->host copy each)."""
        return (
            self.topk_ids.tolist(),
            self.topk_logprobs.tolist(),
            self.sampled_logprobs.tolist(),
            self.sampled_ranks.tolist(),
        )


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [n] int64
    logprobs: SamplerLogprobs | None = None  # None when no row asked for logprobs


class Sampler:
    """Stateless; per-request state (the generators) is owned by the caller and passed in each step."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
        num_logprobs: int | None = None,
        blocked_token_ids: Sequence[Sequence[int] | None] | None = None,
        adjust: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> SamplerOutput:
        """logits [n, V]; params, generators, blocked_token_ids: one per row.

        num_logprobs: top-k width to return; None derives it from the rows' `logprobs` (no logprobs if no row
        asked). blocked_token_ids: per row, ids that must not be sampled this step (EOS and stop ids under
        min_tokens).
        adjust: the batch's logits processors (engine/logits_processors.py), run after the raw logprobs.
        """
        n = logits.shape[0]
        if len(params) != n:
            raise ValueError(f"{len(params)} SamplingParams for {n} logits rows")
        generators = list(generators) if generators is not None else [None] * n
        if num_logprobs is None:
            asked = [p.logprobs for p in params if p.logprobs is not None]
            num_logprobs = max(asked) if asked else -1
        logits = logits.float()

        # 1. raw logprobs first: they describe the model, not the sampling.
        raw_logprobs = torch.log_softmax(logits, dim=-1) if num_logprobs >= 0 else None

        # 2. blocked tokens.
        if blocked_token_ids is not None and any(blocked_token_ids):
            logits = logits.clone()
            rows = [i for i, ids in enumerate(blocked_token_ids) for _ in (ids or ())]
            cols = [t for ids in blocked_token_ids for t in (ids or ())]
            logits[rows, cols] = float("-inf")
        if adjust is not None:
            logits = adjust(logits)

        # 3. greedy rows take the argmax; the rest sample.
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            sampled = self._sample_rows(logits, params, generators, random_rows)
            if len(random_rows) == n:
                token_ids = sampled
            else:
                idx = torch.tensor(random_rows, device=logits.device)
                token_ids = token_ids.index_copy(0, idx, sampled)

        out = SamplerOutput(token_ids=token_ids)
        if raw_logprobs is not None:
            out.logprobs = _gather_logprobs(raw_logprobs, token_ids, num_logprobs)
        return out

    def _sample_rows(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        rows: list[int],
    ) -> torch.Tensor:
        device = logits.device
        sub = [params[i] for i in rows]
        idx = torch.tensor(rows, device=device)
        x = logits.index_select(0, idx)
        temps = torch.tensor([p.temperature for p in sub], device=device, dtype=x.dtype)
        x = x / temps.unsqueeze(1)
        x = _apply_top_k_top_p(x, sub)
        x = _apply_min_p(x, sub)
        probs = torch.softmax(x, dim=-1)
        noise = _exponential_noise(probs.shape, [generators[i] for i in rows], device)
        return (probs / noise).argmax(dim=-1)


def _apply_top_k_top_p(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """x [m, V] temperature-scaled logits -> the same with filtered tokens at -inf."""
    vocab = x.shape[1]
    use_k = any(0 < p.top_k < vocab for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if not (use_k or use_p):
        return x
    device = x.device
    sorted_x, order = x.sort(dim=-1, descending=True)
    positions = torch.arange(vocab, device=device).unsqueeze(0)
    drop = torch.zeros_like(sorted_x, dtype=torch.bool)
    if use_k:
        k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
        drop |= positions >= k.unsqueeze(1)
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    if use_p:
        top_p = torch.tensor([p.top_p for p in params], device=device, dtype=x.dtype)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # keep tokens until the kept mass reaches top_p; the first token always stays
        drop_p = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
        drop_p[:, 0] = False
        drop |= drop_p
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def _apply_min_p(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Drop tokens with p < min_p * p_max, i.e. logit < max_logit + log(min_p); the ratio survives
    renormalisation."""
    if not any(p.min_p > 0.0 for p in params):
        return x
    min_p = torch.tensor([p.min_p for p in params], device=x.device, dtype=x.dtype)
    threshold = x.max(dim=-1, keepdim=True).values + torch.log(min_p).unsqueeze(1)  # log(0) = -inf keeps all
    return x.masked_fill(x < threshold, float("-inf"))


def skip_draw(generator: torch.Generator | None, vocab_size: int, device: torch.device) -> None:
    """Advance a seeded generator past one non-greedy sampling step, exactly as `sample` would consume it.

    A decode node continuing a request whose first token the prefill node sampled calls this, so the request's
    later tokens equal those of colocated generation."""
    if generator is not None:
        torch.empty(vocab_size, device=device).exponential_(generator=generator)


def _exponential_noise(
    shape: torch.Size, generators: Sequence[torch.Generator | None], device: torch.device
) -> torch.Tensor:
    """Exp(1) noise [m, V]: seeded rows from their own generator, the rest from one shared draw."""
    noise = torch.empty(shape, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        noise.exponential_()
    for i in seeded:
        noise[i].exponential_(generator=generators[i])
    # Exp(1) can return exactly 0 in float32; a 0 would turn p/0 into inf (or nan for a filtered token).
    return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _gather_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> SamplerLogprobs:
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))  # [n, 1]
    ranks = (raw_logprobs > sampled).sum(dim=-1) + 1
    k = min(k, raw_logprobs.shape[1])
    if k > 0:
        top_vals, top_ids = raw_logprobs.topk(k, dim=-1)  # sorted descending
    else:
        n = raw_logprobs.shape[0]
        top_vals = raw_logprobs.new_empty((n, 0))
        top_ids = torch.empty((n, 0), dtype=torch.int64, device=raw_logprobs.device)
    return SamplerLogprobs(
        topk_ids=top_ids, topk_logprobs=top_vals, sampled_logprobs=sampled.squeeze(1), sampled_ranks=ranks
    )
