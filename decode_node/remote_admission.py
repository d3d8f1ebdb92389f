"""A thin adapter over the engine's scheduler and KV cache manager for requests whose prompt KV comes from a
prefill node: reserve blocks first, admit the request into the running batch once its KV has landed.

Call these on the engine loop thread only (EngineLoop.call / hooks): they touch scheduler state.
The engine core has no public API for this yet; what this module needs from it, and does by hand, is:
  - reserve: a Request built like add_request builds it, validated by the scheduler, its prefix hits taken and
    blocks for the rest of the prompt allocated, WITHOUT entering the waiting queue;
  - admit: the request joins `running` with num_computed_tokens = prompt length, its prompt blocks offered to
    the prefix cache (so they become hits here and KV events announce them), its first token already appended,
    and its seeded generator advanced past the first token's draw (the prefill node sampled it), so a seeded
    request samples the same tokens as in colocated mode.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from engine.request import Request, RequestStatus


class NoRoomError(RuntimeError):
    """The KV cache cannot hold the prompt's blocks now (retryable: 429)."""


@dataclass(slots=True)
class Reservation:
    request: Request
    block_ids: list[int]  # this node's blocks for prompt blocks num_cached_blocks.., in order
    num_cached_blocks: int  # leading prompt blocks this node already holds (its own prefix hits)


def reserve(core, request_id: str, prompt_token_ids: list[int], params) -> Reservation:
    """Hold blocks for the prompt minus this node's prefix hits. Raises PromptTooLongError / ValueError (400) or
    NoRoomError (429); takes nothing then."""
    kv, scheduler = core.kv_manager, core.scheduler
    request = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling_params=params,
                      block_size=kv.block_size)
    scheduler._validate(request)
    if kv.num_blocks_held(request_id):
        raise ValueError(f"request id {request_id!r} already holds blocks")
    hits, num_hit_tokens = kv.get_computed_blocks(request)
    if not kv.allocate_slots(request, request.num_tokens - num_hit_tokens, hits):
        raise NoRoomError(f"no room for {kv.blocks_for_tokens(request.num_tokens) - len(hits)} KV blocks "
                          f"({kv.num_free_blocks} available)")
    table = kv.block_table(request)
    return Reservation(request, table[len(hits):], len(hits))


def first_token_stop(core, request: Request, token_id: int):
    """Append the prefill node's first token; the final RequestStatus if it ends the request, else None.

    Reads only the scheduler's fixed settings (eos ids, max_model_len), so any thread may call it on a request
    that is not in the scheduler yet."""
    request.append_output_token(token_id)
    return core.scheduler._check_stop(request)


def can_admit(core) -> bool:
    return len(core.scheduler.running) < core.scheduler.max_num_seqs


def admit(core, request: Request, num_cached_tokens: int) -> None:
    """Put a reserved request whose prompt KV has landed into the running batch (first token appended)."""
    scheduler, kv = core.scheduler, core.kv_manager
    rid = request.request_id
    if rid in scheduler.requests:
        raise ValueError(f"request id {rid!r} is already in the scheduler")
    request.num_computed_tokens = request.num_prompt_tokens
    request.num_cached_tokens = num_cached_tokens
    kv.cache_blocks(request, request.num_prompt_tokens)
    request.status = RequestStatus.RUNNING
    scheduler.requests[rid] = request
    scheduler._arrival_order[rid] = scheduler._next_order
    scheduler._next_order += 1
    bisect.insort(scheduler.running, request, key=scheduler._priority)
    params = request.sampling_params
    if params.seed is not None:
        from engine.sampler import make_generator

        generator = make_generator(params.seed, core.runner.device)
        if not params.greedy:  # the prefill node's sampler drew Exp(1) noise over the vocabulary once
            import torch
            torch.empty(core.runner.arch.vocab_size, device=core.runner.device).exponential_(generator=generator)
        core.generators[rid] = generator


def release(core, request_id: str) -> None:
    """Free a request wherever it is: running/waiting in the scheduler (abort) or only reserved (free)."""
    if core.scheduler.get_request(request_id) is not None:
        core.abort_request(request_id)
    else:
        core.kv_manager.free(request_id)
