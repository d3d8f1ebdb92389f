"""The data plane interface, the factory by `kv_connector` name, and tensor <-> bytes helpers.

Control messages always travel on the signed TCP link (`kvconnector.link`); a data plane moves the KV bytes of
each `KVChunk`:
    tcp   the bytes are the chunk frame's body (any device: device tensors are copied to host). CPU default.
    ucx   ucxx tag send/recv, tag = link tag base << 32 | chunk seq (cuda_ipc / NVLink / RDMA / TCP, UCX picks).
    nccl  one NCCL process group per producer/consumer pair, created at handshake; send/recv in chunk order.
Producer side: `send(link, header, tensor)` puts the header on the link and starts moving the bytes; the handle
says when the source buffer may be reused. Consumer side: `receive(link, header, body, ...)` is called when the
header arrives and calls `deliver(tensor)` once the bytes are in a tensor shaped [L, 2, n, *block] on its device.
"""
from __future__ import annotations

import abc
import concurrent.futures
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvconnector.wire import Handshake, KVChunk, TensorMeta

Deliver = Callable[[torch.Tensor], None]
Fail = Callable[[BaseException], None]


@dataclass(frozen=True)
class DataPlaneConfig:
    ip: str = "127.0.0.1"
    device: str = "cpu"
    max_inflight: int = 4  # sends a producer keeps in flight per link before it waits (and coalesces)
    extra: dict = field(default_factory=dict)


class SendHandle:
    """Completion of one data-plane send: done() polls, wait() blocks and re-raises a failure."""

    def __init__(self, future: "concurrent.futures.Future | None" = None):
        self._future = future

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        if self._future is not None:
            self._future.result(timeout)

    def add_done_callback(self, fn: Callable[[BaseException | None], None]) -> None:
        """fn(None) on success, fn(exc) on failure; at once when already done."""
        if self._future is None:
            fn(None)
        else:
            self._future.add_done_callback(lambda f: fn(f.exception()))


class DataPlane(abc.ABC):
    name = "base"

    def __init__(self, config: DataPlaneConfig):
        self.config = config

    def local_info(self) -> dict:
        """What the peer needs to reach our data plane; goes into our Handshake.data_plane."""
        return {}

    def check_peer(self, ours: Handshake, theirs: Handshake) -> str:
        """'' when this data plane can serve the pair, else the refusal the handshake carries back."""
        return ""

    def open(self, link, ours: Handshake, theirs: Handshake, producer: bool) -> None:
        """Per-link setup after both handshakes are known (ucx endpoint, nccl group)."""

    @abc.abstractmethod
    def send(self, link, header: KVChunk, tensor: torch.Tensor) -> SendHandle:
        ...

    @abc.abstractmethod
    def receive(self, link, header: KVChunk, body: memoryview, deliver: Deliver, fail: Fail) -> None:
        ...

    def close_link(self, link) -> None:
        """The link is gone: drop its endpoint / group."""

    def close(self) -> None:
        ...


def deliver_when_landed(future: concurrent.futures.Future, dest: torch.Tensor, deliver: Deliver, fail: Fail,
                        pool, deliveries: concurrent.futures.Executor) -> None:
    """When a posted receive into a pooled buffer completes, hand the buffer to `deliver` (or the error to
    `fail`) on the delivery thread, then return the buffer to its pool."""
    def landed(f: concurrent.futures.Future) -> None:
        def run():
            try:
                if f.exception() is not None:
                    fail(f.exception())
                else:
                    deliver(dest)
            finally:
                pool.put(dest)
        deliveries.submit(run)
    future.add_done_callback(landed)


def create_data_plane(name: str, config: DataPlaneConfig) -> DataPlane:
    if name == "tcp":
        from kvconnector.transport_tcp import TcpDataPlane
        return TcpDataPlane(config)
    if name == "ucx":
        from kvconnector.transport_ucx import UcxDataPlane
        return UcxDataPlane(config)
    if name == "nccl":
        from kvconnector.transport_nccl import NcclDataPlane
        return NcclDataPlane(config)
    raise ValueError(f"kv_connector must be tcp, ucx or nccl, got {name!r}")


# ---------------------------------------------------------------------------------------------------- tensors

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def tensor_meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(dtype_name(t.dtype), list(t.shape))


def host_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes as a flat uint8 memoryview (device tensors are copied to host first)."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def tensor_from_body(meta: TensorMeta, body: memoryview) -> torch.Tensor:
    """View a received body (writable buffer) as the tensor its header describes; checks the size."""
    nbytes = meta.nbytes()
    if len(body) != nbytes:
        raise ValueError(f"body of {len(body)} bytes, header describes {nbytes}")
    flat = torch.frombuffer(body, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    return flat.view(torch_dtype(meta.dtype)).view(meta.shape)


def empty_like_meta(meta: TensorMeta, device: str | torch.device) -> torch.Tensor:
    return torch.empty(meta.shape, dtype=torch_dtype(meta.dtype), device=device)
