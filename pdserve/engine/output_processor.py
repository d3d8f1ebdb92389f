"""Token ids from the engine core -> RequestOutputs with text, logprobs and finish reasons.

Stop strings are found here, on the detokenized text; a request that hits one is finished in the core at once
so its blocks are freed without waiting for max_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.engine_core import EngineCore, StepOutput
from pdserve.engine.outputs import CompletionOutput, Logprob, make_logprob_entry
from pdserve.wire.detokenizer import IncrementalDetokenizer, decode_token
from pdserve.wire.sampling_params import SamplingParams


@dataclass
class _Tracked:
    parent_id: str
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None  # PromptLogprobs, once the first token brought them


class OutputProcessor:
    def __init__(self, core: EngineCore, tokenizer):
        self.core = core
        self.tokenizer = tokenizer
        self.tracked: dict[str, _Tracked] = {}

    def add(self, child_id: str, parent_id: str, index: int, prompt_ids: list[int], params: SamplingParams):
        detok = IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        self.tracked[child_id] = _Tracked(
            parent_id,
            index,
            params,
            detok,
            list(prompt_ids),
            logprobs=[] if params.logprobs is not None else None,
            cumulative_logprob=0.0 if params.logprobs is not None else None,
        )

    def process(self, outputs: list[StepOutput]) -> list[str]:
        """Apply one step's outputs; return the child ids that finished."""
        finished = []
        for out in outputs:
            state = self.tracked[out.request_id]
            state.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs is not None:
                state.prompt_logprobs = self.prompt_entries(
                    out.prompt_logprobs, state.prompt_ids, state.params.prompt_logprobs
                )
            self._append(state, out)
            if state.detokenizer.stopped is not None and state.finish_reason is None:
                state.finish_reason, state.stop_reason = "stop", state.detokenizer.stopped
                if not out.finished:
                    self.core.finish_request(out.request_id, "stop")
                finished.append(out.request_id)
            elif out.finished and state.finish_reason is None:
                state.detokenizer.finish()  # flush a held-back tail (an unfinished character, a stop prefix)
                state.finish_reason = out.finish_reason
                if out.finish_reason == "stop" and state.token_ids:
                    state.stop_reason = state.token_ids[-1]
                finished.append(out.request_id)
        return finished

    def _append(self, state: _Tracked, out: StepOutput) -> None:
        if state.finish_reason is not None:
            return
        for i, token in enumerate(out.new_token_ids):
            state.token_ids.append(token)
            state.detokenizer.add([token])
            if state.logprobs is not None and out.new_logprobs:
                entry = self._logprob_entry(out.new_logprobs[i], token, state.params.logprobs)
                state.logprobs.append(entry)
                state.cumulative_logprob += entry[token].logprob
            if state.detokenizer.stopped is not None:
                break

    def _logprob_entry(self, row, token: int, num_logprobs: int) -> dict[int, Logprob]:
        top_ids, top_values, sampled_logprob, sampled_rank = row
        entry = make_logprob_entry(token, sampled_logprob, sampled_rank, top_ids, top_values, num_logprobs)
        for tid, logprob in entry.items():
            logprob.decoded_token = decode_token(self.tokenizer, tid)
        return entry

    def prompt_entries(self, records: list, prompt: list[int], k: int) -> list:
        """Prompt records -> vLLM's prompt_logprobs: None for the first token, then {token id: Logprob}."""
        return [
            None if row is None else self._logprob_entry(row, token, k)
            for row, token in zip(records, prompt, strict=True)
        ]

    def completion(self, child_id: str) -> CompletionOutput:
        s = self.tracked.pop(child_id)
        return CompletionOutput(
            index=s.index,
            text=s.detokenizer.text,
            token_ids=s.token_ids,
            cumulative_logprob=s.cumulative_logprob,
            logprobs=s.logprobs,
            finish_reason=s.finish_reason,
            stop_reason=s.stop_reason,
        )

    def cached_tokens(self, child_id: str) -> int:
        return self.tracked[child_id].num_cached_tokens

    def prompt_logprobs(self, child_id: str) -> list | None:
        return self.tracked[child_id].prompt_logprobs
