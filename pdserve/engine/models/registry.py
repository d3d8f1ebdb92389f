"""Which class serves which `architectures` entry of config.json. Torch-free to import: classes load on demand."""
from __future__ import annotations

import importlib

from pdserve.wire.errors import CheckpointError

_DECODER = ("pdserve.engine.models.decoder", "CausalLM")
_MODELS = {  # architecture -> (module, class); one decoder serves every family (engine/models/decoder.py)
    name: _DECODER
    for name in (
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "MistralForCausalLM",
        "Qwen3ForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "MixtralForCausalLM",
        "Qwen3MoeForCausalLM",
    )
}
SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def get_model_class(architecture: str):
    if architecture not in _MODELS:
        raise CheckpointError(f"architecture {architecture!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
