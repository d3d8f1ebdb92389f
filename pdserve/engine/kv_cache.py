"""The paged KV cache: one tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].

Layer l's cache is the view [2, num_blocks, block_size, num_kv_heads, head_dim] (K at 0, V at 1), the layout
the attention kernels read and the KV connector gathers from. The number of blocks comes from
--num-gpu-blocks-override if given, else --kv-cache-memory, else on GPU from --gpu-memory-utilization of the
device's memory minus what the weights and a profiling forward already hold, and on CPU from 256 MiB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pdserve.wire.errors import ConfigError

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 256 << 20
GPU_MARGIN_BYTES = 1 << 30


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * elem


def bytes_per_block(arch, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """One block, every layer; `num_kv_heads`: a tensor-parallel rank's share (default: all of them)."""
    heads = arch.num_key_value_heads if num_kv_heads is None else num_kv_heads
    return KVCacheShape(arch.num_hidden_layers, 1, block_size, heads, arch.head_dim).bytes_per_block(dtype)


def decide_num_blocks(
    arch, cache_config, dtype: torch.dtype, device: torch.device, num_kv_heads: int | None = None
) -> int:
    """How many blocks fit, by the precedence in the module docstring (the budget is per rank)."""
    per_block = bytes_per_block(arch, cache_config.block_size, dtype, num_kv_heads)
    if cache_config.num_gpu_blocks_override is not None:
        return cache_config.num_gpu_blocks_override
    if cache_config.kv_cache_memory is not None:
        budget = cache_config.kv_cache_memory
    elif device.type == "cuda":
        budget = _gpu_kv_budget(cache_config.gpu_memory_utilization, device)
    else:
        budget = CPU_DEFAULT_KV_BYTES
    num_blocks = budget // per_block
    if num_blocks < 1:
        raise ConfigError(
            f"no room for a single KV block ({per_block} bytes each, budget {budget} bytes): raise "
            "--gpu-memory-utilization or --kv-cache-memory, or lower --block-size"
        )
    return int(num_blocks)


def _gpu_kv_budget(utilization: float, device: torch.device) -> int:
    """This process may hold `utilization` of the device's memory (vLLM's meaning: its own share, so two nodes
    on one GPU each pass their part); the KV cache gets that minus the weights and the profiled activation
    peak, and never more than is free now, less a margin for allocator slack and the CUDA graphs."""
    free, total = torch.cuda.mem_get_info(device)
    share = int(total * utilization) - torch.cuda.max_memory_allocated(device)
    headroom = (
        free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) - GPU_MARGIN_BYTES
    )
    if share > headroom:
        log.warning(
            "--gpu-memory-utilization %.2f asks for more than is free (other processes hold memory): "
            "the KV cache takes the %.1f GiB that is",
            utilization,
            max(headroom, 0) / 2**30,
        )
    return min(share, headroom)


def allocate_kv_cache(
    arch,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype,
    device: torch.device,
    num_kv_heads: int | None = None,
) -> torch.Tensor:
    heads = arch.num_key_value_heads if num_kv_heads is None else num_kv_heads
    shape = KVCacheShape(arch.num_hidden_layers, num_blocks, block_size, heads, arch.head_dim)
    log.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB)",
        num_blocks,
        block_size,
        num_blocks * shape.bytes_per_block(dtype) / 2**20,
    )
    return torch.zeros(
        (shape.num_layers, 2, num_blocks, block_size, shape.num_kv_heads, shape.head_dim),
        dtype=dtype,
        device=device,
    )


def export_cuda_ipc(layers: list[torch.Tensor]) -> dict:
    """What another process needs to map this process's per-layer caches (one allocation) over CUDA IPC: the
    allocation's handle, the layers' byte offsets in it, their dtype, shape and strides. The KV connector's
    cuda_ipc plane sends it; a tensor-parallel worker hands rank 0 its own (engine/tp_workers.py)."""
    import os

    first = layers[0]
    ipc = list(first.untyped_storage()._share_cuda_())  # device, handle, size, offset, refcount file, event
    elem = first.element_size()
    return {
        "host": os.uname().nodename,
        "ipc": ipc,
        "dtype": str(first.dtype).removeprefix("torch."),
        "shape": list(first.shape),
        "stride": list(first.stride()),
        "layer_offsets": [c.storage_offset() * elem for c in layers],
    }


def import_cuda_ipc(export: dict, device: torch.device) -> list[torch.Tensor]:
    """Another process's per-layer caches (its `export_cuda_ipc`) as tensors of this process on `device`:
    opening the handle maps that allocation, on a peer GPU through peer access. The mapping lives as long as
    the tensors do."""
    _, handle, size, offset, ref_handle, ref_offset, event, sync = export["ipc"]
    storage = torch.UntypedStorage._new_shared_cuda(
        device.index, handle, size, offset, ref_handle, ref_offset, event, sync
    )
    dtype = getattr(torch, export["dtype"])
    layers = []
    for byte_offset in export["layer_offsets"]:
        t = torch.empty(0, dtype=dtype, device=device)
        t.set_(storage, byte_offset // dtype.itemsize, export["shape"], export["stride"])
        layers.append(t)
    return layers
