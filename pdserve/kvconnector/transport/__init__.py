"""KV data planes: one-sided writes of a layer's blocks into the blocks a peer reserved, chosen by
`kv_connector`.

    tcp       the bytes travel as signed frame bodies on the control link and the consumer's link thread
              writes them into its cache (CPU, tests; any device works, through host memory).
    cuda_ipc  GPUs of one host: the consumer exports its whole KV cache once (CUDA IPC handle, in its
              handshake); the producer maps it and, after each layer, one kernel copies that layer's blocks
              into the peer's memory (NVLink between GPUs, the same HBM when both processes share a GPU). The
              GPU default.
    nixl      NIXL (UCX inside: NVLink on one host, RDMA across hosts): the consumer registers its cache
              and hands over its agent metadata at handshake; the producer WRITEs each layer as a few large
              descriptors (runs of consecutive blocks), posted by a sender thread once the layer is computed.
The consumer's host does nothing per layer on either plane: it hears one `Done` per request.

Under tensor parallelism (kvconnector/head_layout.py) tcp sends every head of a block whatever the TP sizes,
gathered from and scattered to the ranks that hold them; cuda_ipc writes each producer rank's heads into the
consumer ranks that hold them (a head-slice copy where their heads differ); nixl writes whole blocks into
each consumer rank, from the producer rank holding the same heads or packed through a staging ring
(transport/nixl_routes.py).
"""

from __future__ import annotations

from pdserve.engine.config import KV_CONNECTORS
from pdserve.kvconnector.transport.base import (
    DataPlane,
    DataPlaneConfig,
    Fence,
    PeerWrites,
    dtype_name,
    torch_dtype,
)


def create_data_plane(name: str, config: DataPlaneConfig, layout) -> DataPlane:
    """layout: the node's HeadLayout (one rank's per-layer [2, N, block_size, kv_heads, head_dim] tensors
    without tensor parallelism)."""
    from pdserve.kvconnector.head_layout import HeadLayout

    layout = HeadLayout.of(layout)
    if name == "tcp":
        from pdserve.kvconnector.transport.tcp import TcpDataPlane

        return TcpDataPlane(config, layout)
    if name == "cuda_ipc":
        from pdserve.kvconnector.transport.cuda_ipc import CudaIpcDataPlane

        return CudaIpcDataPlane(config, layout)
    if name == "nixl":
        from pdserve.kvconnector.transport.nixl import NixlDataPlane

        return NixlDataPlane(config, layout)
    raise ValueError(f"kv_connector must be one of {', '.join(KV_CONNECTORS)}, got {name!r}")


__all__ = [
    "DataPlane",
    "DataPlaneConfig",
    "Fence",
    "PeerWrites",
    "KV_CONNECTORS",
    "create_data_plane",
    "dtype_name",
    "torch_dtype",
]
