"""The offline API, shaped like vLLM's: `LLM(model=DIR, ...).generate(prompts, SamplingParams(...))`; `model`
is a folder or a Hugging Face hub id in the local cache (`org/name`, looked up offline)."""

from __future__ import annotations

import itertools
from typing import Sequence, Union

from pdserve.engine.checkpoint import load_arch_config
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_core import EngineCore
from pdserve.engine.output_processor import OutputProcessor
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import Request
from pdserve.wire.sampling_params import SamplingParams, tokenize_bad_words
from pdserve.wire.tokenizer import load_tokenizer

Prompt = Union[str, dict]


class LLM:
    def __init__(self, model: str, **engine_args):
        self._start(EngineConfig.create(model=model, **engine_args))

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        llm = cls.__new__(cls)
        llm._start(config)
        return llm

    def _start(self, config: EngineConfig) -> None:
        self.config = config
        load_arch_config(config.model.model)  # a bad folder or architecture is named before anything loads
        self.tokenizer = load_tokenizer(config.model.model)
        self.core = EngineCore(config, eos_token_ids=self.tokenizer.eos_token_ids)
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def close(self) -> None:
        """Stop the tensor-parallel ranks this engine started (nothing to do with one rank)."""
        self.core.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        raise TypeError("a prompt is a string or {'prompt_token_ids': [...]}")

    def _with_bad_word_ids(self, params: SamplingParams) -> SamplingParams:
        """bad_words are strings; the engine reads them tokenized (as the proxy sends them)."""
        if not params.bad_words or params.bad_words_token_ids is not None:
            return params
        return params.clone(bad_words_token_ids=tokenize_bad_words(self.tokenizer, params.bad_words))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params_list = (
            list(sampling_params)
            if isinstance(sampling_params, (list, tuple))
            else [sampling_params or SamplingParams()] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        params_list = [self._with_bad_word_ids(p) for p in params_list]
        processor = OutputProcessor(self.core, self.tokenizer)
        # 1. Tokenize and check everything before anything is queued, so bad input loses nothing (the
        # scheduler    also refuses a request that could never fit the whole KV cache).
        parsed = [self._prompt_ids(p) for p in prompts]
        for (_, ids), params in zip(parsed, params_list, strict=False):
            self.core.scheduler.validate(
                Request(
                    request_id="check",
                    prompt_token_ids=ids,
                    sampling_params=params,
                    block_size=self.config.cache.block_size,
                )
            )
        # 2. Queue n children per prompt; a seed gives child i the seed + i, so each sample differs yet
        # repeats.
        parents = []
        try:
            for (text, ids), params in zip(parsed, params_list, strict=False):
                parent_id = str(next(self._ids))
                children = []
                for index in range(params.n):
                    child_params = params if params.seed is None else params.clone(seed=params.seed + index)
                    child_id = f"{parent_id}-{index}"
                    processor.add(child_id, parent_id, index, ids, child_params)
                    self.core.add_request(child_id, ids, child_params)
                    children.append(child_id)
                parents.append((parent_id, text, ids, children))
            # 3. Step until every child finished.
            while self.core.has_unfinished():
                processor.process(self.core.step())
        except BaseException:  # an interrupted call frees what it queued, so the next call starts clean
            for child_id in processor.tracked:
                self.core.abort_request(child_id)
            raise
        # 4. Collect, in prompt order.
        results = []
        for parent_id, text, ids, children in parents:
            cached = processor.cached_tokens(children[0])
            prompt_logprobs = processor.prompt_logprobs(children[0])
            outputs = [processor.completion(c) for c in children]
            results.append(
                RequestOutput(
                    request_id=parent_id,
                    prompt=text,
                    prompt_token_ids=ids,
                    outputs=outputs,
                    finished=True,
                    num_cached_tokens=cached,
                    prompt_logprobs=prompt_logprobs,
                )
            )
        return results
