"""tcp data plane: a chunk's KV bytes are its control frame's body, signed with the frame (the CPU default).

Any device works: a device tensor is copied to host before sending and the consumer copies into its cache device
when it scatters. The send is synchronous on the producer's sender thread, so at most one chunk per link is in
flight and the layers that finish meanwhile are coalesced into the next chunk.
"""
from __future__ import annotations

from kvconnector.transport import DataPlane, Deliver, Fail, SendHandle, host_bytes, tensor_from_body
from kvconnector.wire import KVChunk


class TcpDataPlane(DataPlane):
    name = "tcp"

    def send(self, link, header: KVChunk, tensor) -> SendHandle:
        link.send(header, host_bytes(tensor))
        return SendHandle()

    def receive(self, link, header: KVChunk, body: memoryview, deliver: Deliver, fail: Fail) -> None:
        try:
            tensor = tensor_from_body(header.tensor, body)
        except ValueError as exc:
            fail(exc)
            return
        deliver(tensor)
