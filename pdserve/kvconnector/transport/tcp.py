"""tcp data plane: each layer's blocks of each request travel as one signed frame on the control link (CPU).

The producer gathers a request's blocks of the layer and sends them on the calling (forward) thread; the link
is ordered, so by the time the consumer reads the request's `Done` its link thread has written every earlier
frame into the cache, and a fence is complete as soon as it is taken. Any device works, through host memory.
A frame carries every KV head of its blocks, gathered from a tensor-parallel node's ranks
(kvconnector/head_layout.py), so the two sides' TP sizes need not match.
"""

from __future__ import annotations

import torch

from pdserve.kvconnector.head_layout import HeadLayout
from pdserve.kvconnector.transport.base import (
    DataPlane,
    Fence,
    PeerWrites,
    host_bytes,
    tensor_from_body,
    tensor_meta,
)
from pdserve.wire.frames import KVChunk

_DONE = Fence()


class TcpDataPlane(DataPlane):
    name = "tcp"

    def __init__(self, config, layout):
        self.layout = HeadLayout.of(layout)
        super().__init__(config, self.layout.layers)

    def stage(self, writes: PeerWrites) -> None:
        device = self.caches[0].device
        writes.staged = [torch.tensor(s, dtype=torch.int64, device=device) for s in writes.src]  # per request

    def write_layer(self, writes: PeerWrites, layer: int) -> None:
        link = writes.link
        if link.closed:
            return
        for rid, src_ids, dst in zip(writes.request_ids, writes.staged, writes.dst, strict=False):
            if not dst:
                continue
            blocks = self.layout.gather(layer, src_ids).unsqueeze(0)  # [1, 2, n, *block]
            header = KVChunk(
                request_id=rid,
                seq=0,
                first_layer=layer,
                num_layers=1,
                block_ids=dst,
                tensor=tensor_meta(blocks),
            )
            try:
                link.send(header, host_bytes(blocks))
            except ConnectionError:
                return  # the link's close handler fails the requests on it

    def fence(self, link) -> Fence:
        return _DONE

    def receive(self, header: KVChunk, body: memoryview) -> torch.Tensor:
        return tensor_from_body(header.tensor, body)
