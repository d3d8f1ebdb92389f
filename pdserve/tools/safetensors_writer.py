"""Write safetensors files one tensor at a time, so a 16 GB checkpoint never sits in memory whole.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and byte
range, then the raw bytes. Shapes and dtypes are known before any tensor exists, so the header is written
first and each tensor is produced, written and dropped in turn. Files above `max_shard_bytes` are split into
`model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`, as Hugging Face lays them out.
"""

from __future__ import annotations

import json
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


def plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _header(specs: list[TensorSpec], dtype: torch.dtype) -> bytes:
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        end = offset + spec.numel * itemsize
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def _produce(
    specs: list[TensorSpec], make_tensor: Callable[[TensorSpec], torch.Tensor], workers: int
) -> Iterator[torch.Tensor]:
    """make_tensor over specs, in order, `workers` tensors ahead of the writer (torch releases the GIL)."""
    if workers <= 1:
        yield from (make_tensor(spec) for spec in specs)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for spec in specs:
            pending.append(pool.submit(make_tensor, spec))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_file(
    path: str,
    specs: list[TensorSpec],
    dtype: torch.dtype,
    make_tensor: Callable[[TensorSpec], torch.Tensor],
    on_bytes: Callable[[int], None],
    workers: int = 1,
) -> None:
    """Write one safetensors file; `make_tensor(spec)` must return a CPU tensor of `dtype` and
    `spec.shape`."""
    tmp = path + ".partial"  # a crash never leaves a file that looks complete
    with open(tmp, "wb") as f:
        f.write(_header(specs, dtype))
        for spec, tensor in zip(specs, _produce(specs, make_tensor, workers), strict=False):
            tensor = tensor.contiguous()
            if tensor.dtype != dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"{spec.name}: made {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {spec.shape}"
                )
            data = tensor.view(torch.uint8).numpy() if tensor.numel() else b""
            f.write(memoryview(data))
            on_bytes(spec.numel * tensor.element_size())
            del tensor, data
    os.replace(tmp, path)


def write_checkpoint(
    folder: str,
    specs: list[TensorSpec],
    dtype: torch.dtype,
    make_tensor: Callable[[TensorSpec], torch.Tensor],
    max_shard_bytes: int,
    on_bytes: Callable[[int], None] = lambda n: None,
    workers: int = 1,
) -> list[str]:
    """Write all tensors into `folder`; returns the file names written (index included when sharded).
    `workers` threads make tensors ahead of the writer (memory: up to workers + 1 tensors at once)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(specs, itemsize, max_shard_bytes)
    if len(shards) == 1:
        write_file(os.path.join(folder, SINGLE_FILE), shards[0], dtype, make_tensor, on_bytes, workers)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {spec.name: name for name, shard in zip(names, shards, strict=False) for spec in shard}
    for name, shard in zip(names, shards, strict=False):
        write_file(os.path.join(folder, name), shard, dtype, make_tensor, on_bytes, workers)
    total = sum(spec.numel for spec in specs) * itemsize
    with open(os.path.join(folder, INDEX_FILE), "w") as f:  # last: an index means every shard is complete
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [INDEX_FILE]
