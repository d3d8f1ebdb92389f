"""The engine both node roles share: config, checkpoints, models, paged KV cache, scheduler, runner, sampler.

`from engine import LLM, SamplingParams` is the offline API. Names resolve lazily so that torch-free modules
(wire.tokenizer, wire.detokenizer, wire.sampling_params) can be imported by the proxy without torch.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LLM": "engine.llm",
    "SamplingParams": "wire.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "EngineConfig": "engine.config",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
