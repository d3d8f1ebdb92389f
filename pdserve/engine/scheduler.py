"""One scheduler for prefill chunks and decode tokens in the same step, under a token budget (vLLM V1's
shape).

Torch-free. Each step:
  1. RUNNING requests, oldest first, each get what they still need (1 token for a decode, the next chunk of a
     prompt or of a recompute) within `max_num_batched_tokens`. When the KV cache cannot hold a request's new
     tokens, the youngest running request is preempted by recompute (blocks freed, back to the waiting queue)
     until it fits, possibly preempting the requester itself.
  2. WAITING requests are admitted FCFS (prefix hits first, then a chunk of the rest), while the budget,
     `max_num_seqs` and the KV cache allow. Admission stops at the first request that does not fit (no
     overtaking, so a long prompt cannot starve), and is skipped in a step that preempted: the blocks just
     freed belong to the preempted requests, which would otherwise thrash against newcomers.
  3. The output lists decodes first, then prefills (the runner's flat-batch order).
Before step 1, requests whose prompt KV a prefill node has written (WAITING_FOR_REMOTE_KVS, then marked ready)
join the running batch in the order they became ready, while `max_num_seqs` allows: the decode node's one
table of its requests is this scheduler's, with no queue beside it.

Priority is arrival order at this scheduler: `running` is kept sorted by it, so the victim is always the last
running request, which step 1 has not scheduled yet. A preempted request re-enters the waiting queue ahead of
every request that arrived after it (so at the front, behind only older preempted requests).

A request can never be stuck forever: add_request rejects one whose prompt plus max_tokens needs more KV
blocks than the whole cache, so the oldest running request always fits once everything younger is preempted.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Iterable

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import STATUS_BY_REASON, Request, RequestStatus
from pdserve.engine.scheduler_output import ScheduledRequest, SchedulerOutput, SchedulerStats
from pdserve.wire.errors import PromptTooLongError


class RequestTooLargeError(PromptTooLongError):
    """The request's prompt plus max_tokens needs more KV blocks than the whole cache holds."""


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.enable_chunked_prefill = config.enable_chunked_prefill
        self.kv = kv_cache_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()  # sorted by arrival order
        self.running: list[Request] = []  # sorted by arrival order; the last is the next victim
        self.remote: dict[
            str, Request
        ] = {}  # WAITING_FOR_REMOTE_KVS: blocks held, KV arriving from elsewhere
        self.remote_ready: deque[Request] = deque()  # of those, landed: join `running` in this order
        self._arrival_order: dict[str, int] = {}
        self._next_order = 0
        self._finished_ids: list[str] = []  # since the last schedule(), for the runner to forget
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; raises PromptTooLongError (or its RequestTooLargeError) if it can never run."""
        self.validate(request)
        request.set_block_size(self.kv.block_size)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._arrival_order[request.request_id] = self._next_order
        self._next_order += 1
        self.waiting.append(request)

    def add_remote(self, request: Request) -> None:
        """Track a request whose blocks the caller allocated and whose prompt KV another node writes into
        them: never scheduled until `remote_kv_ready`, freed like any other on finish or abort."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.requests[request.request_id] = request
        self._arrival_order[request.request_id] = self._next_order
        self._next_order += 1
        self.remote[request.request_id] = request

    def remote_kv_ready(self, request_id: str) -> bool:
        """The prompt's KV has landed (its first token appended): join the batch at the next step with
        room."""
        request = self.remote.get(request_id)
        if request is None or request in self.remote_ready:
            return False
        request.num_computed_tokens = request.num_prompt_tokens
        self.remote_ready.append(request)
        return True

    def _admit_remote_ready(self) -> None:
        while self.remote_ready and len(self.running) < self.max_num_seqs:
            request = self.remote_ready.popleft()
            del self.remote[request.request_id]
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=self._priority)

    def finish_request(self, request_id: str, status: RequestStatus | str) -> Request | None:
        """End a request from outside (stop string seen by the detokenizer, abort); frees all its blocks.

        status is a final RequestStatus or a finish reason ("stop", "length", "abort"). Returns the request,
        or None if it is unknown or already finished.
        """
        request = self.requests.get(request_id)
        if request is None:
            return None
        status = STATUS_BY_REASON[status] if isinstance(status, str) else status
        if not status.is_finished:
            raise ValueError(f"finish_request needs a final status, got {status!r}")
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            del self.remote[request_id]
            if request in self.remote_ready:
                self.remote_ready.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request, status)
        return request

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        """Work a step could do: requests waiting for remote KV are not, until it has landed."""
        return bool(self.waiting or self.running or self.remote_ready)

    def get_num_unfinished(self) -> int:
        return len(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    # ---- one step ------------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        # 0. requests whose KV a prefill node wrote, as slots allow
        self._admit_remote_ready()
        # 1. running requests first: they hold blocks and may preempt younger ones to grow
        budget = self._schedule_running(self.max_num_batched_tokens, scheduled, preempted)
        # 2. newcomers only in a step that took nobody's blocks away
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        # 3. decodes first, then prefills, each in scheduling order
        decodes = [s for s in scheduled if s.is_decode]
        prefills = [s for s in scheduled if not s.is_decode]
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            scheduled=decodes + prefills,
            num_decodes=len(decodes),
            num_scheduled_tokens=sum(s.num_new_tokens for s in scheduled),
            preempted_request_ids=preempted,
            finished_request_ids=finished,
        )

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance the scheduled requests by the step's results; return those that finished (blocks freed).

        sampled maps request_id -> token id for every entry with `samples` set. Entries whose request finished
        or was aborted after schedule() are ignored.
        """
        finished: list[Request] = []
        for item in output.scheduled:
            request = self.requests.get(item.request_id)
            if (
                request is None
                or request.status != RequestStatus.RUNNING
                or request.num_computed_tokens != item.num_computed_tokens
            ):
                continue
            # 1. the step's K/V is in the cache now
            request.num_computed_tokens += item.num_new_tokens
            # 2. a chunk that completes the request's tokens produced a new one
            if item.samples:
                if item.request_id not in sampled:
                    raise KeyError(
                        f"step scheduled request {item.request_id} to sample, but no token came back"
                    )
                request.append_output_token(sampled[item.request_id])
            # 3. newly full blocks become prefix hits for others
            self.kv.cache_blocks(request, request.num_computed_tokens)
            self.kv.release_out_of_window(request)  # sliding-window models: blocks no layer reads again
            # 4. stop conditions on the new token
            status = self.check_stop(request) if item.samples else None
            if status is not None:
                self._release(request, status)
                finished.append(request)
        if finished:
            self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]
        return finished

    # ---- step parts ----------------------------------------------------------------------------------------
    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest], preempted: list[str]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # the request itself was the last one left to preempt
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # Prompt logprobs need every position computed: no hits read (its blocks are still cached after).
            no_reads = request.wants_prompt_logprobs
            hits, num_hit_tokens = ([], 0) if no_reads else self.kv.get_computed_blocks(request)
            num_remaining = request.num_tokens - num_hit_tokens
            num_new = min(num_remaining, budget)
            # Chunking off: wait for a step with room for all of it, unless it never fits one (a long
            # recompute).
            if (
                num_new < num_remaining
                and not self.enable_chunked_prefill
                and num_remaining <= self.max_num_batched_tokens
            ):
                break
            if not self.kv.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            self._admit(request, num_hit_tokens)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

    def _admit(self, request: Request, num_hit_tokens: int) -> None:
        if request.num_cached_tokens < 0:  # first scheduling: this is what the client's prompt found cached
            request.num_cached_tokens = num_hit_tokens
            self.kv.record_prefix_lookup(request, num_hit_tokens)
        request.num_computed_tokens = num_hit_tokens
        request.status = RequestStatus.RUNNING
        bisect.insort(self.running, request, key=self._priority)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        # Ahead of every later arrival; only older preempted requests stay in front (they sit at the head).
        order, i = self._priority(request), 0
        while i < len(self.waiting) and self._priority(self.waiting[i]) < order:
            i += 1
        self.waiting.insert(i, request)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=request.all_token_ids[start:end],
            num_computed_tokens=start,
            block_ids=self.kv.block_table(request),
            is_decode=num_new == 1 and end == request.num_tokens and request.num_output_tokens > 0,
            samples=end == request.num_tokens,
        )

    def check_stop(self, request: Request) -> RequestStatus | None:
        """Stop tokens (after min_tokens) win over length, so a final eos reads as "stop"."""
        params, token = request.sampling_params, request.output_token_ids[-1]
        if request.num_output_tokens >= (getattr(params, "min_tokens", 0) or 0):
            if token in self.eos_token_ids and not getattr(params, "ignore_eos", False):
                return RequestStatus.FINISHED_STOPPED
            if token in (getattr(params, "stop_token_ids", None) or ()):
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        max_tokens = request.max_tokens
        if (
            max_tokens is not None and request.num_output_tokens >= max_tokens
        ) or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _release(self, request: Request, status: RequestStatus) -> None:
        """Final bookkeeping; the caller has already taken the request out of waiting/running."""
        request.status = status
        self.kv.free(request)
        del self.requests[request.request_id]
        del self._arrival_order[request.request_id]
        self._finished_ids.append(request.request_id)

    def _priority(self, request: Request) -> int:
        return self._arrival_order[request.request_id]

    def validate(self, request: Request) -> None:
        rid, prompt_len = request.request_id, request.num_prompt_tokens
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if prompt_len == 0:
            raise ValueError(f"request {rid} has an empty prompt")
        max_tokens = request.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"request {rid}: max_tokens must be at least 1, got {max_tokens}")
        wanted = prompt_len + (max_tokens if max_tokens is not None else 1)
        if wanted > self.max_model_len:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens plus max_tokens {max_tokens or 1} exceeds --max-model-len "
                f"{self.max_model_len}"
            )
        final_len = (
            min(prompt_len + max_tokens, self.max_model_len) if max_tokens is not None else self.max_model_len
        )
        # The last sampled token is never fed back, so the KV cache holds at most final_len - 1 tokens.
        needed = self.kv.blocks_for_tokens(max(final_len - 1, prompt_len))
        if needed > self.kv.num_blocks:
            raise RequestTooLargeError(
                f"request {rid} needs {needed} KV blocks for {final_len} tokens, but the whole cache has "
                f"{self.kv.num_blocks}; lower max_tokens or give the KV cache more memory"
            )
        if not self.enable_chunked_prefill and request.num_tokens > self.max_num_batched_tokens:
            raise PromptTooLongError(
                f"prompt of {prompt_len} tokens exceeds --max-num-batched-tokens "
                f"{self.max_num_batched_tokens} with chunked prefill off"
            )

    # ---- gauges --------------------------------------------------------------------------------------------
    def make_stats(self) -> SchedulerStats:
        stats = self.kv.pool.stats
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queried_tokens=stats.queried_tokens,
            prefix_cache_hit_tokens=stats.hit_tokens,
            num_preemptions=self.num_preemptions,
        )

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()
