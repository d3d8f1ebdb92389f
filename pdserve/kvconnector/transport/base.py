"""The one-sided data plane interface, and tensor helpers its implementations share.

Producer (prefill node), all on the forward thread except `fence`:
    begin_step()                 before a step's forward: nothing may overwrite source blocks an earlier
                                 step's writes have not read yet (the engine frees a prefilled request's
                                 blocks at once)
    end_step()                   after it, whether or not the forward completed
    stage(writes)                after the step's plan: per peer, its requests' local -> remote block ids
    write_layer(writes, layer)   after layer `layer` wrote its KV: put that layer's blocks into the peer's
                                 blocks
    fence(link) -> Fence         completes once every write issued so far to that peer has landed there
Consumer (decode node): `local_info()` goes into its handshake (what a producer needs to write into its
cache); `receive(header, body)` is for planes whose bytes arrive on the control link (tcp) and returns the
tensor.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from pdserve.wire.frames import Handshake, KVChunk, TensorMeta


@dataclass(frozen=True)
class DataPlaneConfig:
    ip: str = "127.0.0.1"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class PeerWrites:
    """One step's blocks bound for one peer. request_ids[i]'s local blocks src[i] go to the peer's dst[i];
    `staged` is what the plane's stage() prepared from them (block ids on the device)."""

    link: object
    request_ids: list[str]
    src: list[list[int]]
    dst: list[list[int]]
    staged: object = None

    @property
    def num_blocks(self) -> int:
        return sum(len(s) for s in self.src)


class Fence:
    """A point on the data plane: `wait()` blocks (GIL released, no spinning) until every write issued before
    it has landed; `exposed_s` is the time the last write outlived the compute it followed, where measured.
    `failed` is set when a write before it could not land (the completion thread sets it when wait()
    raises)."""

    failed = False

    def wait(self) -> None:
        pass

    def exposed_s(self) -> Optional[float]:
        return None


class DataPlane(abc.ABC):
    name = "base"

    def __init__(self, config: DataPlaneConfig, caches: Sequence[torch.Tensor]):
        self.config = config
        self.caches = list(caches)  # per layer [2, N, block_size, kv_heads, head_dim]

    def local_info(self) -> dict:
        """What a producer needs to write into our cache; sent only in our answer to an authenticated
        handshake."""
        return {}

    def check_peer(self, ours: Handshake, theirs: Handshake) -> str:
        """'' when this data plane can serve the pair, else the refusal the handshake carries back."""
        return ""

    def open(self, link, ours: Handshake, theirs: Handshake, producer: bool) -> None:  # noqa: B027  (an optional hook)
        """Per-link setup once both handshakes are known (the producer maps the consumer's cache)."""

    def begin_step(self) -> None:  # noqa: B027  (an optional hook)
        """Forward thread, before the step's forward."""

    def stage(self, writes: PeerWrites) -> None:  # noqa: B027  (an optional hook)
        """Forward thread, once per step and peer, before the forward: prepare the block ids."""

    @abc.abstractmethod
    def write_layer(self, writes: PeerWrites, layer: int) -> None:
        """Forward thread: layer `layer` of writes' blocks into the peer's blocks."""

    def end_step(self) -> None:  # noqa: B027  (an optional hook)
        """Forward thread, after the step's forward (whether or not it completed)."""

    @abc.abstractmethod
    def fence(self, link) -> Fence: ...

    def receive(self, header: KVChunk, body: memoryview) -> torch.Tensor:
        raise TypeError(f"the {self.name} data plane receives no bytes on the control link")

    def close_link(self, link) -> None:  # noqa: B027  (an optional hook)
        """The link is gone: drop what we hold for that peer (a mapping of its cache)."""

    def close(self) -> None: ...  # noqa: B027  (an optional hook)


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
