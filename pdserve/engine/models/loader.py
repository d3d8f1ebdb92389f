"""Build the model for a checkpoint folder and fill it from the safetensors files.

Hugging Face names map onto ours one to one, except that q/k/v go into rows of `qkv_proj` and gate/up into rows
of `gate_up_proj`. Every parameter must be filled exactly once with the right shape; a tied checkpoint may carry a
redundant `lm_head.weight`, and old ones a `rotary_emb.inv_freq` buffer: both are skipped. Anything else is an
error, since it means config.json and the weights disagree.
"""
from __future__ import annotations

import logging

import torch

from pdserve.engine.checkpoint import ArchConfig, iter_tensors, load_arch_config
from pdserve.wire.errors import CheckpointError
from pdserve.engine.models.registry import get_model_class

log = logging.getLogger(__name__)

_PACKED = {  # HF projection -> (our fused projection, index of its rows)
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def _target(model: torch.nn.Module, params: dict, name: str) -> tuple[str, torch.Tensor | None] | None:
    """(key, destination) for the HF tensor `name`: the key names what got filled (fused parts as
    `qkv_proj.weight[1]`), the destination is our parameter or its rows, None when we have no such parameter.
    Returns None for tensors we skip."""
    parts = name.split(".")
    if parts[-1] == "inv_freq" or (name == "lm_head.weight" and model.lm_head is None):
        return None
    if len(parts) < 2 or parts[-2] not in _PACKED:
        return name, params.get(name)
    fused, index = _PACKED[parts[-2]]
    ours = ".".join(parts[:-2] + [fused, parts[-1]])
    if ours not in params:
        return name, None
    splits = model.get_submodule(".".join(parts[:-2] + [fused])).splits
    return f"{ours}[{index}]", params[ours].narrow(0, sum(splits[:index]), splits[index])


def _needed_keys(model: torch.nn.Module) -> list[str]:
    """Every key load_weights must fill: a fused parameter once per part."""
    keys = []
    for module_name, module in model.named_modules():
        splits = getattr(module, "splits", ())
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            keys += [f"{full}[{i}]" for i in range(len(splits))] if len(splits) > 1 else [full]
    return keys


def _hf_name(key: str) -> str:
    """qkv_proj.weight[1] -> k_proj.weight, for error messages in the checkpoint's own names."""
    if not key.endswith("]"):
        return key
    name, index = key[:-1].split("[")
    parts = name.split(".")
    hf = next(h for h, (fused, i) in _PACKED.items() if fused == parts[-2] and i == int(index))
    return ".".join(parts[:-2] + [hf, parts[-1]])


def load_weights(model: torch.nn.Module, model_dir: str, progress: bool = True) -> None:
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, tensor in iter_tensors(model_dir, progress=progress):
        found = _target(model, params, name)
        if found is None:
            continue
        key, dest = found
        if dest is None:
            raise CheckpointError(f"{model_dir}: unexpected tensor {name} (do config.json and the weights match?)")
        if tuple(tensor.shape) != tuple(dest.shape):
            raise CheckpointError(f"{model_dir}: tensor {name} has shape {tuple(tensor.shape)}, but config.json "
                                  f"implies {tuple(dest.shape)}")
        dest.copy_(tensor)
        filled.add(key)
    missing = [_hf_name(k) for k in _needed_keys(model) if k not in filled]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {missing[0]} is missing from the checkpoint{more}")


@torch.no_grad()  # not inference_mode: parameters made there would be inference tensors, awkward for callers
def load_model(model_dir: str, dtype: torch.dtype, device, progress: bool = True) -> tuple[torch.nn.Module, ArchConfig]:
    """(model in eval mode on `device` with weights of `dtype`, its ArchConfig)."""
    arch = load_arch_config(model_dir)
    device = torch.device(device)
    model = get_model_class(arch.architecture)(arch, dtype, device)
    load_weights(model, model_dir, progress=progress)
    return model.eval(), arch
