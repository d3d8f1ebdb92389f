"""The engine both node roles share: config, checkpoints, models, paged KV cache, scheduler, runner, sampler.

`from pdserve import LLM, SamplingParams` (or from this package) is the offline API. Importing any part of
this package loads torch; what must stay torch-free (the proxy, the benchmark client) imports only `wire/`.
"""

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm import LLM
from pdserve.engine.outputs import CompletionOutput, RequestOutput
from pdserve.wire.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig"]
