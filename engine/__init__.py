"""The engine both node roles share: config, checkpoints, models, paged KV cache, scheduler, runner, sampler.

`from engine import LLM, SamplingParams` is the offline API. Importing any part of this package loads torch;
what must stay torch-free (the proxy, the benchmark client) lives in `wire/`.
"""

from engine.config import EngineConfig
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from wire.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]
