"""Per-request logits adjustments, applied to a whole batch at once: allowed_token_ids, bad words, logit_bias,
penalties (presence, frequency, repetition) and structured output (a grammar's token mask).

Order, as vLLM's sampler: the grammar mask, allowed_token_ids, bad words, logit_bias, then penalties. The
sampler calls `apply` after it took the raw logprobs (which describe the model, as vLLM returns them by
default) and before temperature and the top-k / top-p filters; `record` then counts the sampled tokens.

Decisions:
- State lives on the logits' device. Penalties keep each request's output-token counts [V] (int32) and its
  prompt-token mask [V] in rows of two slot tensors; the sampled tokens are counted with one scatter on the
  device (`record`), never through the host. A request's counts start from its output tokens when it first
  samples here, so a decode node counts the prefill node's first token; a preempted request keeps its counts.
- The batch's index and value tensors (rows, slots, penalties, bias entries, allowed masks, single-token bad
  words) are built when the batch changes (another set or order of requests) and reused while it does not.
  What must be read each step is host work by nature: multi-token bad words (a prefix match on the output) and
  grammars (llguidance computes a bitmask on the host, into one pinned buffer, copied to the device once).
- GPU path: the model runner's CUDA graphs end at the logits; all of this runs eagerly after the graph replay,
  as plain tensor ops on the device (no host sync except the grammar's mask upload, non-blocking from pinned
  memory), so graphs stay valid whatever the requests ask.
- A grammar's matcher advances with each token this node appends (`record`, or `sync` for tokens sampled
  elsewhere: the prefill node's first token). When its grammar has ended, `record` reports the request, and
  the engine finishes it ("stop") even under ignore_eos.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _RequestState:
    slot: int = -1  # row in the penalty tensors; -1 when the request uses no penalty
    num_counted: int = 0  # output tokens already in its counts / consumed by its matcher
    matcher: object = None  # llguidance.LLMatcher
    bad_prefixes: list[tuple[list[int], int]] = field(default_factory=list)  # multi-token bad words


@dataclass(slots=True)
class _BatchPlan:
    """Index tensors for one batch of requests (rows are positions in the step's logits)."""

    key: tuple
    pen_rows: torch.Tensor | None = None  # [p] rows with penalties
    pen_slots: torch.Tensor | None = None  # [p] their slots
    presence: torch.Tensor | None = None  # [p, 1]
    frequency: torch.Tensor | None = None  # [p, 1]
    repetition: torch.Tensor | None = None  # [p, 1]
    bias_rows: torch.Tensor | None = None  # [e] one entry per (row, token) bias
    bias_cols: torch.Tensor | None = None  # [e]
    bias_vals: torch.Tensor | None = None  # [e]
    allow_rows: torch.Tensor | None = None  # [a] rows limited to allowed_token_ids
    allow_mask: torch.Tensor | None = None  # [a, V] bool, True = allowed
    ban_rows: torch.Tensor | None = None  # [b] single-token bad words
    ban_cols: torch.Tensor | None = None  # [b]
    host_rows: list[int] = field(default_factory=list)  # rows with grammars or multi-token bad words


class LogitsProcessors:
    def __init__(self, vocab_size: int, device: torch.device, model_dir: str | None = None, eos_ids=()):
        self.vocab_size = vocab_size
        self.device = device
        self.model_dir = model_dir
        self.eos_ids = sorted(eos_ids)
        self.states: dict[str, _RequestState] = {}
        self.counts: torch.Tensor | None = None  # [slots, V] int32
        self.prompt_mask: torch.Tensor | None = None  # [slots, V] bool
        self.free_slots: list[int] = []
        self.plan: _BatchPlan | None = None
        self._ll_tokenizer = None
        self._bitmask: torch.Tensor | None = None  # pinned host [n, ceil(V/32)] int32

    # ---- request lifecycle ---------------------------------------------------------------------------------
    @staticmethod
    def needed(params) -> bool:
        return bool(
            params.uses_penalties
            or params.logit_bias
            or params.allowed_token_ids
            or params.bad_words_token_ids
            or params.structured
        )

    def release(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None and state.slot >= 0:
            self.free_slots.append(state.slot)
        if state is not None:
            self.plan = None

    def _state(self, request) -> _RequestState:
        state = self.states.get(request.request_id)
        if state is not None:
            return state
        params = request.sampling_params
        state = _RequestState()
        if params.uses_penalties:
            state.slot = self._take_slot()
            self.counts[state.slot].zero_()
            self.prompt_mask[state.slot].zero_()
            prompt = torch.tensor(request.prompt_token_ids, dtype=torch.long, device=self.device)
            self.prompt_mask[state.slot, prompt] = True
        if params.structured:
            state.matcher = self._matcher(params.structured)
        for seq in params.bad_words_token_ids or ():
            if len(seq) > 1:
                state.bad_prefixes.append((list(seq[:-1]), seq[-1]))
        self.states[request.request_id] = state
        return state

    def _take_slot(self) -> int:
        if not self.free_slots:
            old = 0 if self.counts is None else self.counts.shape[0]
            new = max(8, old * 2)
            counts = torch.zeros((new, self.vocab_size), dtype=torch.int32, device=self.device)
            mask = torch.zeros((new, self.vocab_size), dtype=torch.bool, device=self.device)
            if old:
                counts[:old] = self.counts
                mask[:old] = self.prompt_mask
            self.counts, self.prompt_mask = counts, mask
            self.free_slots.extend(range(new - 1, old - 1, -1))
        return self.free_slots.pop()

    def _matcher(self, spec: dict):
        import llguidance

        from pdserve.wire.structured_grammar import grammar_for

        if self._ll_tokenizer is None:
            if self.model_dir is None:
                raise ValueError("structured output needs the checkpoint's tokenizer.json")
            import os

            path = os.path.join(self.model_dir, "tokenizer.json")
            self._ll_tokenizer = llguidance.LLTokenizer(
                path, n_vocab=self.vocab_size, eos_token=self.eos_ids or None
            )
        matcher = llguidance.LLMatcher(self._ll_tokenizer, grammar_for(spec), log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured output: {matcher.get_error()}")
        return matcher

    # ---- one step ------------------------------------------------------------------------------------------
    def sync(self, requests: Sequence) -> None:
        """Catch each request's state up with output tokens appended elsewhere (a first token sampled on the
        prefill node, or before this node saw the request). A cheap length check per request."""
        for request in requests:
            if not self.needed(request.sampling_params):
                continue
            state = self._state(request)
            missing = request.output_token_ids[state.num_counted :]
            if missing:
                self._count(state, missing)

    def _count(self, state: _RequestState, tokens: list[int]) -> None:
        if state.slot >= 0:
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
            self.counts[state.slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
        if state.matcher is not None:
            state.matcher.consume_tokens(tokens)
        state.num_counted += len(tokens)

    def apply(self, logits: torch.Tensor, requests: Sequence) -> torch.Tensor:
        """logits [n, V] float32, one row per request -> the adjusted logits (a new tensor if any applies)."""
        plan = self._plan(requests)
        if plan is None:
            return logits
        logits = logits.clone()
        if plan.host_rows:
            self._apply_host(logits, requests, plan.host_rows)
        if plan.allow_rows is not None:
            sub = logits.index_select(0, plan.allow_rows).masked_fill(~plan.allow_mask, float("-inf"))
            logits.index_copy_(0, plan.allow_rows, sub)
        if plan.ban_rows is not None:
            logits[plan.ban_rows, plan.ban_cols] = float("-inf")
        if plan.bias_rows is not None:
            logits.index_put_((plan.bias_rows, plan.bias_cols), plan.bias_vals, accumulate=True)
        if plan.pen_rows is not None:
            logits.index_copy_(0, plan.pen_rows, self._penalize(logits.index_select(0, plan.pen_rows), plan))
        return logits

    def _penalize(self, x: torch.Tensor, plan: _BatchPlan) -> torch.Tensor:
        counts = self.counts.index_select(0, plan.pen_slots)  # [p, V]
        seen = counts > 0
        repeated = seen | self.prompt_mask.index_select(0, plan.pen_slots)
        rep = plan.repetition
        x = torch.where(repeated, torch.where(x > 0, x / rep, x * rep), x)
        x = x - plan.frequency * counts.to(x.dtype)
        return x - plan.presence * seen.to(x.dtype)

    def _apply_host(self, logits: torch.Tensor, requests: Sequence, rows: list[int]) -> None:
        """Grammar masks and multi-token bad words: computed on the host, uploaded once."""
        words = self.vocab_size
        grammar_rows = [r for r in rows if self.states[requests[r].request_id].matcher is not None]
        if grammar_rows:
            from llguidance.torch import fill_next_token_bitmask

            mask = self._host_bitmask(len(grammar_rows))
            for i, r in enumerate(grammar_rows):
                fill_next_token_bitmask(self.states[requests[r].request_id].matcher, mask, i)
            bits = mask.to(self.device, non_blocking=True)
            shifts = torch.arange(32, device=self.device, dtype=torch.int32)
            allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :words]  # [g, V]
            idx = torch.tensor(grammar_rows, device=self.device)
            logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill(~allowed, float("-inf")))
        bans = []
        for r in rows:
            request = requests[r]
            out = request.output_token_ids
            for prefix, last in self.states[request.request_id].bad_prefixes:
                if len(out) >= len(prefix) and list(out[len(out) - len(prefix) :]) == prefix:
                    bans.append((r, last))
        if bans:
            r_idx, c_idx = zip(*bans, strict=True)
            logits[list(r_idx), list(c_idx)] = float("-inf")

    def _host_bitmask(self, n: int) -> torch.Tensor:
        width = (self.vocab_size + 31) // 32
        if self._bitmask is None or self._bitmask.shape[0] < n:
            pin = self.device.type == "cuda"
            self._bitmask = torch.full((max(n, 8), width), -1, dtype=torch.int32, pin_memory=pin)
        return self._bitmask[:n]

    def record(self, requests: Sequence, token_ids: torch.Tensor, tokens: list[int]) -> list[str]:
        """Count this step's sampled tokens (token_ids [n] on the device; tokens, the same on the host).
        Returns the requests whose grammar has ended (the engine finishes them)."""
        plan = self.plan
        if plan is None or plan.key != tuple(r.request_id for r in requests):
            return []
        if plan.pen_rows is not None:
            sampled = token_ids.index_select(0, plan.pen_rows)
            self.counts.index_put_(
                (plan.pen_slots, sampled), torch.ones_like(sampled, dtype=torch.int32), accumulate=True
            )
        ended = []
        for i, request in enumerate(requests):
            state = self.states.get(request.request_id)
            if state is None:
                continue
            state.num_counted += 1
            if state.matcher is not None:
                state.matcher.consume_token(tokens[i])
                if state.matcher.is_stopped() or state.matcher.is_error():
                    ended.append(request.request_id)
        return ended

    # ---- the batch's tensors -------------------------------------------------------------------------------
    def _plan(self, requests: Sequence) -> _BatchPlan | None:
        key = tuple(r.request_id for r in requests)
        if self.plan is not None and self.plan.key == key:
            return self.plan if self._active(self.plan) else None
        self.sync(requests)
        self.plan = self._build(key, requests)
        return self.plan if self._active(self.plan) else None

    @staticmethod
    def _active(plan: _BatchPlan) -> bool:
        return any(
            t is not None for t in (plan.pen_rows, plan.bias_rows, plan.allow_rows, plan.ban_rows)
        ) or bool(plan.host_rows)

    def _build(self, key: tuple, requests: Sequence) -> _BatchPlan:
        dev, plan = self.device, _BatchPlan(key)
        pen, bias, allow, bans = [], [], [], []
        for row, request in enumerate(requests):
            params = request.sampling_params
            state = self.states.get(request.request_id)
            if state is None:
                continue
            if state.slot >= 0:
                pen.append((row, state.slot, params))
            for tok, value in (params.logit_bias or {}).items():
                if tok < self.vocab_size:
                    bias.append((row, tok, value))
            if params.allowed_token_ids:
                allow.append((row, params.allowed_token_ids))
            bans.extend((row, seq[0]) for seq in params.bad_words_token_ids or () if len(seq) == 1)
            if state.matcher is not None or state.bad_prefixes:
                plan.host_rows.append(row)
        if pen:
            rows, slots, ps = zip(*pen, strict=True)
            plan.pen_rows = torch.tensor(rows, device=dev)
            plan.pen_slots = torch.tensor(slots, device=dev)
            plan.presence = torch.tensor([[p.presence_penalty] for p in ps], device=dev)
            plan.frequency = torch.tensor([[p.frequency_penalty] for p in ps], device=dev)
            plan.repetition = torch.tensor([[p.repetition_penalty] for p in ps], device=dev)
        if bias:
            rows, cols, vals = zip(*bias, strict=True)
            plan.bias_rows = torch.tensor(rows, device=dev)
            plan.bias_cols = torch.tensor(cols, device=dev)
            plan.bias_vals = torch.tensor(vals, device=dev, dtype=torch.float32)
        if allow:
            mask = torch.zeros((len(allow), self.vocab_size), dtype=torch.bool, device=dev)
            for i, (_, ids) in enumerate(allow):
                mask[
                    i, torch.tensor([t for t in ids if t < self.vocab_size], dtype=torch.long, device=dev)
                ] = True
            plan.allow_rows = torch.tensor([row for row, _ in allow], device=dev)
            plan.allow_mask = mask
        if bans:
            rows, cols = zip(*bans, strict=True)
            plan.ban_rows = torch.tensor(rows, device=dev)
            plan.ban_cols = torch.tensor(cols, device=dev)
        return plan
