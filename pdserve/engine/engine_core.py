"""The engine's step loop: schedule, run the model, sample, update. Token ids in, token ids out.

Text (detokenization, stop strings) is the caller's business: the offline LLM's output processor here, the
proxy when serving. They finish a request early through `finish_request`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.logits_processors import LogitsProcessors
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.prompt_logprobs import plan_rows, take
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler, make_generator, skip_draw
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.scheduler_output import SchedulerOutput
from pdserve.engine.step_isolation import StepFailed, sample_rows_isolated
from pdserve.wire.sampling_params import SamplingParams
from pdserve.wire.sliding_window import all_layers_slide, shipped_from


class StepObserver(Protocol):
    def before_forward(self, plan: SchedulerOutput) -> None: ...

    def after_forward(self, ok: bool) -> None:
        """Runs even when the forward raised (ok False)."""


class NoRoomError(RuntimeError):
    """The KV cache cannot hold a prompt's blocks right now (retryable: 429)."""


@dataclass(slots=True)
class Reservation:
    request: Request
    block_ids: list[int]  # this node's blocks for prompt blocks num_cached_blocks.., in order
    num_cached_blocks: int  # leading prompt blocks this node already holds (its own prefix hits)
    layer_skips: tuple[int, ...] = ()  # per layer: leading blocks of block_ids its sliding window never reads


@dataclass(slots=True)
class StepOutput:
    """What one request got from one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list | None = None  # per new token: (top ids, top logprobs, sampled logprob, sampled rank)
    # With the first token, when params.prompt_logprobs is set and this node prefilled: one record per prompt
    # token, the same shape (its logprob and rank in place of the sampled token's); the first is None.
    prompt_logprobs: list | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_cached_tokens: int = 0
    error: str | None = None  # set when this request alone failed in the step (finished, reason "abort")


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    tokens_computed: int = 0
    started: float = field(default_factory=time.perf_counter)


class EngineCore:
    def __init__(
        self, config: EngineConfig, eos_token_ids: frozenset[int] = frozenset(), emit_kv_events: bool = False
    ):
        self.config = config
        self.runner = ModelRunner(config)
        max_model_len = self._max_model_len()
        self.block_pool = BlockPool(
            self.runner.num_blocks,
            enable_caching=config.cache.enable_prefix_caching,
            block_size=config.cache.block_size,
            emit_events=emit_kv_events,
        )
        self.kv_manager = KVCacheManager(
            self.block_pool,
            config.cache.block_size,
            max_model_len,
            free_window=all_layers_slide(self.runner.arch.layer_windows),
        )
        self.scheduler = Scheduler(
            config.scheduler, self.kv_manager, max_model_len=max_model_len, eos_token_ids=eos_token_ids
        )
        self.sampler = Sampler()
        self.processors = LogitsProcessors(
            self.runner.arch.vocab_size, self.runner.device, config.model.model, eos_token_ids
        )
        self.generators: dict[str, torch.Generator] = {}
        self.prompt_logprob_ids: set[str] = set()  # requests whose prompt logprobs are still to compute here
        self.stats = EngineStats()
        # Told about each step around its forward pass (the prefill node's KV producer is one).
        self.step_observers: list[StepObserver] = []

    @property
    def max_model_len(self) -> int:
        return self.scheduler.max_model_len

    def close(self) -> None:
        self.runner.close()

    def _max_model_len(self) -> int:
        arch_len = self.runner.arch.max_position_embeddings
        asked = self.config.model.max_model_len
        if asked is not None and asked > arch_len:
            from pdserve.wire.errors import ConfigError

            raise ConfigError(
                f"--max-model-len {asked} exceeds the model's max_position_embeddings {arch_len}"
            )
        return asked or arch_len

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError (a 400) for what a step could not run: a token id outside the vocabulary, or a grammar
        that does not compile."""
        self.check_token_ids(prompt_token_ids, params)
        if params.structured:
            from pdserve.wire.structured_grammar import check_spec

            check_spec(params.structured)

    def check_token_ids(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError (a 400) for a token id outside the model's vocabulary, in the prompt or any id the
        params name: one would otherwise index out of range inside a step (the embedding, the sampler's
        masks). Cheap: a node checks at its door with it, before the request reaches the engine loop."""
        vocab = self.runner.arch.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {vocab})")
        named = {
            "stop_token_ids": params.stop_token_ids,
            "allowed_token_ids": params.allowed_token_ids or (),
            "logit_bias": list(params.logit_bias or ()),
            "bad_words": [t for seq in params.bad_words_token_ids or () for t in seq],
        }
        for name, ids in named.items():
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name}: {bad[0]} is outside the vocabulary (size {vocab})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        self.check_request(prompt_token_ids, params)
        request = Request(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling_params=params
        )
        self.scheduler.add_request(request)
        if params.seed is not None:
            self.generators[request_id] = make_generator(params.seed, self.runner.device)
        if params.prompt_logprobs is not None:
            self.prompt_logprob_ids.add(request_id)
        return request

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        self.generators.pop(request_id, None)
        self.processors.release(request_id)
        self.prompt_logprob_ids.discard(request_id)

    def finish_request(self, request_id: str, reason: str = "stop") -> None:
        self.scheduler.finish_request(request_id, reason)
        self.generators.pop(request_id, None)
        self.processors.release(request_id)
        self.prompt_logprob_ids.discard(request_id)

    # ---- requests whose prompt KV is computed elsewhere (the decode node's side of disaggregation) ---------
    def reserve_remote(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Reservation:
        """Hold blocks for the prompt minus this node's own prefix hits, without queueing the request.

        Raises PromptTooLongError / ValueError (bad request) or NoRoomError (retry later); takes nothing
        then."""
        kv = self.kv_manager
        self.check_request(prompt_token_ids, params)
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            block_size=kv.block_size,
            prompt_logprobs_done=True,  # the prefill node computes them (and may read our prefix hits' KV)
        )
        self.scheduler.validate(request)
        if kv.num_blocks_held(request_id) or self.scheduler.get_request(request_id) is not None:
            raise ValueError(f"request id {request_id!r} is already in use")
        hits, num_hit_tokens = kv.get_computed_blocks(request)
        if not kv.allocate_slots(request, request.num_tokens - num_hit_tokens, hits):
            raise NoRoomError(
                f"no room for {kv.blocks_for_tokens(request.num_tokens) - len(hits)} KV blocks "
                f"({kv.num_free_blocks} available)"
            )
        self.scheduler.add_remote(request)
        windows = self.runner.arch.layer_windows
        skips = tuple(max(0, s - len(hits)) for s in shipped_from(windows, request.num_tokens, kv.block_size))
        if any(skips):  # those blocks' sliding layers stay empty: they must never become prefix hits here
            kv.skip_caching(request_id)
        return Reservation(request, kv.block_table(request)[len(hits) :], len(hits), skips)

    def remote_kv_ready(self, request_id: str, num_cached_tokens: int) -> bool:
        """A reserved request's prompt KV has landed (its first token already appended): it joins the batch at
        the next step with a free slot (the scheduler's WAITING_FOR_REMOTE_KVS -> RUNNING). False if
        unknown."""
        request = self.scheduler.get_request(request_id)
        if request is None or not self.scheduler.remote_kv_ready(request_id):
            return False
        request.num_cached_tokens = num_cached_tokens
        self.kv_manager.cache_blocks(
            request, request.num_prompt_tokens
        )  # now prefix hits here, and announced
        params = request.sampling_params
        if params.seed is not None:
            generator = make_generator(params.seed, self.runner.device)
            if not params.greedy:  # the prefill node's sampler consumed one draw for the first token
                skip_draw(generator, self.runner.arch.vocab_size, self.runner.device)
            self.generators[request.request_id] = generator
        return True

    def release(self, request_id: str) -> None:
        """Free a request wherever it is: queued, running, or waiting for its remote KV."""
        self.abort_request(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[StepOutput]:
        """One step. Raises StepFailed for a step-wide failure; a failure of one request's own work (sampling)
        ends only that request, with `StepOutput.error` set."""
        # 1. Decide who runs and how many tokens each computes.
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        ids = [item.request_id for item in plan.scheduled]
        # 2. Run the forward pass; logits only for chunks that reach their request's last known token. Nothing
        # about any request has moved yet if this raises, so the step can be retried.
        rows = [row for row, item in enumerate(plan.scheduled) if item.samples]
        get = self.scheduler.get_request
        prompt_rows = plan_rows(plan, self.prompt_logprob_ids, get) if self.prompt_logprob_ids else None
        try:
            for observer in self.step_observers:
                observer.before_forward(plan)
            ok = False
            try:
                logits = self.runner.execute(plan.scheduled, rows, prompt_rows)
                ok = True
            finally:
                for observer in self.step_observers:
                    observer.after_forward(ok)
        except Exception as exc:
            raise StepFailed(ids, retryable=True, cause=exc) from exc
        if prompt_rows is not None:
            prompt_rows.store()
        # 3. Sample (per-request failures isolated), then let the scheduler advance, stop and free.
        requests = [self.scheduler.get_request(plan.scheduled[row].request_id) for row in rows]
        sampled, failed, grammar_done = self._sample(logits, requests)
        for request_id in failed:
            self.abort_request(request_id)  # update_from_output skips requests no longer in the scheduler
        try:
            finished = self.scheduler.update_from_output(
                plan, {rid: tok for rid, (tok, _) in sampled.items()}
            )
            finished += self._finish_grammars(grammar_done, finished)
        except Exception as exc:
            raise StepFailed(ids, retryable=False, cause=exc) from exc
        self.stats.steps += 1
        self.stats.tokens_computed += plan.num_scheduled_tokens
        return self._outputs(sampled, finished) + [
            StepOutput(rid, [], finished=True, finish_reason="abort", error=why)
            for rid, why in failed.items()
        ]

    def _finish_grammars(self, request_ids: list[str], finished: list[Request]) -> list[Request]:
        """Requests whose grammar ended with this step's token stop here (a finished one is already done)."""
        done = {r.request_id for r in finished}
        more = []
        for request_id in request_ids:
            request = self.scheduler.get_request(request_id)
            if request is not None and request_id not in done and not request.is_finished():
                self.scheduler.finish_request(request_id, "stop")
                more.append(request)
        return more

    def _sample(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[dict[str, tuple[int, tuple | None]], dict[str, str], list[str]]:
        """({request id: (token, logprob row)}, {request id: error}, [ids whose grammar ended]) - the batch at
        once, or row by row after the batch raised, so one request's bad parameters fail only that request."""
        if not requests:
            return {}, {}, []
        params = [r.sampling_params for r in requests]
        generators = [self.generators.get(r.request_id) for r in requests]
        try:
            blocked = self._blocked_before_min_tokens(requests)
            out = self.sampler.sample(
                logits,
                params,
                generators,  # logprob width comes from the rows that ask
                blocked_token_ids=blocked,
                adjust=lambda x: self.processors.apply(x, requests),
            )
            tokens = out.token_ids.tolist()
            lp_rows = list(zip(*out.logprobs.tolists(), strict=False)) if out.logprobs is not None else None
            grammar_done = self.processors.record(requests, out.token_ids, tokens)
        except Exception:  # noqa: BLE001 - find the row(s) at fault; the others still get their token
            return self._sample_one_by_one(logits, requests)
        result = {}
        for i, request in enumerate(requests):
            logprob = lp_rows[i] if lp_rows is not None and params[i].logprobs is not None else None
            result[request.request_id] = (tokens[i], logprob)
        return result, {}, grammar_done

    def _sample_one_by_one(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> tuple[dict[str, tuple[int, tuple | None]], dict[str, str], list[str]]:
        grammar_done: list[str] = []

        def sample_one(row: int) -> tuple[int, tuple | None]:
            request = requests[row]
            params = request.sampling_params
            blocked = self._blocked_before_min_tokens([request])
            out = self.sampler.sample(
                logits[row : row + 1],
                [params],
                [self.generators.get(request.request_id)],
                blocked_token_ids=blocked,
                adjust=lambda x: self.processors.apply(x, [request]),
            )
            logprob = None
            if out.logprobs is not None and params.logprobs is not None:
                logprob = next(zip(*out.logprobs.tolists(), strict=False))
            token = int(out.token_ids[0])
            grammar_done.extend(self.processors.record([request], out.token_ids, [token]))
            return token, logprob

        rows, failed = sample_rows_isolated(sample_one, [r.request_id for r in requests])
        return {requests[row].request_id: value for row, value in rows.items()}, failed, grammar_done

    def _blocked_before_min_tokens(self, requests: list[Request]) -> list[list[int]] | None:
        """Until a request has min_tokens outputs it may not sample EOS (unless ignore_eos) or its stop ids,
        as in vLLM; stopping alone would emit the EOS and carry on past it."""
        blocked = []
        for request in requests:
            params = request.sampling_params
            ids: list[int] = []
            if request.num_output_tokens < params.min_tokens:
                ids = list(params.stop_token_ids)
                if not params.ignore_eos:
                    ids += self.scheduler.eos_token_ids
            blocked.append(ids)
        return blocked if any(blocked) else None

    def _outputs(self, sampled: dict, finished: list[Request]) -> list[StepOutput]:
        done = {r.request_id: r for r in finished}
        outputs = []
        for request_id, (token, logprob) in sampled.items():
            request = done.pop(request_id, None) or self.scheduler.get_request(request_id)
            prompt_logprobs = None
            if request_id in self.prompt_logprob_ids:  # its first token: the prompt was computed here
                prompt_logprobs = take(request)
                self.prompt_logprob_ids.discard(request_id)
            outputs.append(
                StepOutput(
                    request_id,
                    [token],
                    [logprob] if logprob is not None else None,
                    finished=request.is_finished(),
                    finish_reason=request.finish_reason,
                    num_cached_tokens=request.num_cached_tokens,
                    prompt_logprobs=prompt_logprobs,
                )
            )
        for request_id, request in done.items():  # finished without sampling this step
            outputs.append(
                StepOutput(
                    request_id,
                    [],
                    finished=True,
                    finish_reason=request.finish_reason,
                    num_cached_tokens=request.num_cached_tokens,
                )
            )
        for request in finished:
            self.generators.pop(request.request_id, None)
            self.processors.release(request.request_id)
            self.prompt_logprob_ids.discard(request.request_id)
        return outputs
