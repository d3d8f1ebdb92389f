"""Build the model for a checkpoint folder and fill it from the safetensors files.

Hugging Face names map onto ours one to one, except the fused and stacked parameters: q/k/v go into rows of
`qkv_proj`, gate/up into rows of `gate_up_proj`, and each expert's projections (`...experts.3.w1.weight`) into
its slice of the stacked `experts.w13` / `experts.w2` (engine/models/moe.py). Every parameter must be filled
exactly once with the right shape; a tied checkpoint may carry a redundant `lm_head.weight`, and old ones a
`rotary_emb.inv_freq` buffer: both are skipped. Anything else is an error naming the tensor in the checkpoint's
own words, since it means config.json and the weights disagree: it must fail here, never mid-request.
Under tensor parallelism a module's `hf_cuts` names the slice of each Hugging Face tensor its rank holds
(engine/tensor_parallel.py); the loader cuts the tensor before the shape check.
"""
from __future__ import annotations

import logging
import re

import torch

from pdserve.engine.checkpoint import ArchConfig, iter_tensors, load_arch_config
from pdserve.engine.models.layers import RMSNorm
from pdserve.engine.models.moe import FusedExperts
from pdserve.engine.models.registry import get_model_class
from pdserve.engine.tensor_parallel import TPGroup, check_divisible
from pdserve.wire.errors import CheckpointError

log = logging.getLogger(__name__)

_PACKED = {  # HF projection -> (our fused projection, index of its rows)
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")


Target = tuple[str, "torch.Tensor | None", "tuple[int, int, int] | None"]  # (key, destination, cut)


def _cut(module, param: str, part: int = 0):
    return getattr(module, "hf_cuts", {}).get(param, [None] * (part + 1))[part]


def _expert_target(model, name: str) -> Target | None:
    """(key, rows of the stacked parameter, cut) for one expert's projection, or None if `name` is not one."""
    match = _EXPERT.match(name)
    if match is None:
        return None
    try:
        experts = model.get_submodule(match["block"])
    except AttributeError:
        return name, None, None
    if not isinstance(experts, FusedExperts):
        return name, None, None
    expert, proj = int(match["expert"]), match["proj"]
    for stacked, projs in experts.hf_names.items():
        if proj in projs and expert < experts.num_experts:
            part = projs.index(proj)
            splits = experts.row_splits[stacked]
            dest = getattr(experts, stacked)[expert].narrow(0, sum(splits[:part]), splits[part])
            return f"{match['block']}.{stacked}[{expert}][{part}]", dest, _cut(experts, stacked, part)
    return name, None, None


def _plain_target(model: torch.nn.Module, params: dict, name: str) -> Target:
    dest = params.get(name)
    if dest is None:
        return name, None, None
    module = model.get_submodule(name.rsplit(".", 1)[0])
    real = getattr(module, "real_rows", None)  # a vocabulary shard: its padding rows take nothing
    if real is not None:
        dest = dest.narrow(0, 0, real)
    return name, dest, _cut(module, name.rsplit(".", 1)[1])


def _target(model: torch.nn.Module, params: dict, name: str) -> Target | None:
    """(key, destination, cut) for the HF tensor `name`: the key names what got filled (fused parts as
    `qkv_proj.weight[1]`), the destination is our parameter or its rows, None when we have no such parameter;
    the cut is the slice of `name` this rank holds (None: all of it). Returns None for tensors we skip."""
    parts = name.split(".")
    if parts[-1] == "inv_freq" or (name == "lm_head.weight" and model.lm_head is None):
        return None
    expert = _expert_target(model, name)
    if expert is not None:
        return expert
    if len(parts) < 2 or parts[-2] not in _PACKED:
        return _plain_target(model, params, name)
    fused, index = _PACKED[parts[-2]]
    ours = ".".join(parts[:-2] + [fused, parts[-1]])
    if ours not in params:
        return name, None, None
    module = model.get_submodule(".".join(parts[:-2] + [fused]))
    splits = module.splits
    dest = params[ours].narrow(0, sum(splits[:index]), splits[index])
    return f"{ours}[{index}]", dest, _cut(module, parts[-1], index)


def _needed(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(key, the checkpoint's name for it) for every key load_weights must fill: a fused parameter once per
    part, a stacked expert parameter once per expert and part."""
    needed = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, FusedExperts):
            for stacked, projs in module.hf_names.items():
                needed += [(f"{prefix}{stacked}[{e}][{p}]", f"{prefix}{e}.{proj}.weight")
                           for e in range(module.num_experts) for p, proj in enumerate(projs)]
            continue
        splits = getattr(module, "splits", ())
        for param_name, _ in module.named_parameters(recurse=False):
            if len(splits) <= 1:
                needed.append((prefix + param_name, prefix + param_name))
                continue
            hf = [h for h, (fused, _) in _PACKED.items() if module_name.endswith(fused)]
            base = prefix.removesuffix(module_name.split(".")[-1] + ".")
            needed += [(f"{prefix}{param_name}[{i}]", f"{base}{hf[i]}.{param_name}") for i in range(len(splits))]
    return needed


def load_weights(model: torch.nn.Module, model_dir: str, progress: bool = True) -> None:
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, tensor in iter_tensors(model_dir, progress=progress):
        found = _target(model, params, name)
        if found is None:
            continue
        key, dest, cut = found
        if cut is not None:
            tensor = tensor.narrow(*cut)
        if dest is None:
            raise CheckpointError(f"{model_dir}: unexpected tensor {name} (do config.json and the weights match?)")
        if tuple(tensor.shape) != tuple(dest.shape):
            raise CheckpointError(f"{model_dir}: tensor {name} has shape {tuple(tensor.shape)}, but config.json "
                                  f"implies {tuple(dest.shape)}")
        if key in filled:
            raise CheckpointError(f"{model_dir}: tensor {name} appears twice in the checkpoint")
        dest.copy_(tensor)
        filled.add(key)
    missing = [hf for key, hf in _needed(model) if key not in filled]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{model_dir}: tensor {missing[0]} is missing from the checkpoint{more}")
    _fold_norm_offsets(model)


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """vLLM's `--load-format dummy`: every parameter uniform in [-1e-3, 1e-3] from `seed`, drawn on the model's
    device, so a shape too big to write out (a 30B MoE) can be benchmarked from its config.json alone. Router
    logits come out near-equal, so tokens spread over the experts about uniformly, as a trained router's
    load balancing aims for."""
    params = list(model.parameters())
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    for param in params:
        param.uniform_(-1e-3, 1e-3, generator=gen)
    _fold_norm_offsets(model)


def _fold_norm_offsets(model: torch.nn.Module) -> None:
    """Gemma's (1 + w) norms: fold the 1 into the weight once, so the kernel computes x * w as for others."""
    for module in model.modules():
        if isinstance(module, RMSNorm) and module.offset:
            module.weight.add_(module.offset)


@torch.no_grad()  # not inference_mode: parameters made there would be inference tensors, awkward for callers
def load_model(model_dir: str, dtype: torch.dtype, device, progress: bool = True, load_format: str = "auto",
               seed: int = 0, tp: TPGroup | None = None) -> tuple[torch.nn.Module, ArchConfig]:
    """(model in eval mode on `device` with weights of `dtype`, its ArchConfig). load_format "dummy" reads only
    config.json (init_dummy_weights). `tp`: the rank's group; it builds and fills only the rank's slices."""
    arch = load_arch_config(model_dir)
    device = torch.device(device)
    tp = tp or TPGroup.single()
    check_divisible(arch, tp.size)
    model = get_model_class(arch.architecture)(arch, dtype, device, tp)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_weights(model, model_dir, progress=progress)
    return model.eval(), arch
