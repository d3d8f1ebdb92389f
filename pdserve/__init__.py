"""pdserve: disaggregated prefill/decode LLM serving.

`from pdserve import LLM, SamplingParams` is the offline API, shaped like vLLM's. The names load on first use,
so that importing a torch-free part (`pdserve.proxy`, `pdserve.wire`, the `pdserve bench` client) never
imports torch through this file.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Each public name and the module that defines it.
_LAZY = {
    "LLM": "pdserve.engine.llm",
    "EngineConfig": "pdserve.engine.config",
    "RequestOutput": "pdserve.engine.outputs",
    "CompletionOutput": "pdserve.engine.outputs",
    "SamplingParams": "pdserve.wire.sampling_params",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
