"""ucx data plane (ucxx): UCX picks cuda_ipc, NVLink, RDMA or TCP; on CPU tests `UCX_TLS=tcp UCX_NET_DEVICES=lo`.

Setup at handshake: the consumer's handshake carries its UCX worker address; the producer makes one endpoint to
it per link. Each producer process picks a random 31-bit tag base (in its handshake); chunk `seq` goes out with
tag `base << 32 | seq` and the consumer posts a worker-level tag receive for exactly that tag when the chunk's
header arrives on the control link, so the bytes may arrive before or after the header.
Many sends stay in flight (the producer's max_inflight), which is what makes per-layer messages fast on one GPU
(DESIGN.md: 32 x 8 MB all in flight 1.3 ms vs 4.1 ms one by one); receive buffers come from a pool so UCX's
registration cache sees the same memory again.
All ucxx calls run on one asyncio loop thread per process; deliveries (scatters) run on another thread so they
never stall UCX's completions.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import threading

import torch

from kvconnector.transport import (DataPlane, DataPlaneConfig, Deliver, Fail, SendHandle, deliver_when_landed,
                                   empty_like_meta)
from kvconnector.wire import Handshake, KVChunk

log = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _ucx_loop() -> asyncio.AbstractEventLoop:
    """One event loop thread per process, with ucxx initialised on it."""
    global _loop
    with _loop_lock:
        if _loop is None:
            import ucxx  # noqa: F401  (imported here: it pulls CUDA libraries)
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="kv-ucx-loop", daemon=True).start()

            async def init():
                import ucxx
                ucxx.init()
            asyncio.run_coroutine_threadsafe(init(), loop).result(30)
            _loop = loop
        return _loop


def _as_ucx_buffer(t: torch.Tensor):
    """A contiguous tensor's bytes as something ucxx takes: numpy for host, the CUDA array interface for device."""
    flat = t.view(torch.uint8).reshape(-1)
    return flat.numpy() if flat.device.type == "cpu" else flat


def _abort_quietly(ep) -> None:
    try:
        ep.abort()
    except Exception:  # already closed by the peer
        pass


class UcxDataPlane(DataPlane):
    name = "ucx"

    def __init__(self, config: DataPlaneConfig):
        super().__init__(config)
        if config.device.startswith("cpu"):
            os.environ.setdefault("UCX_TLS", "tcp")
            os.environ.setdefault("UCX_NET_DEVICES", "lo")
        self.loop = _ucx_loop()
        import ucxx
        self._ucxx = ucxx
        self.address = bytes(self._run(self._get_address()))
        self.tag_base = random.getrandbits(31) | 1
        self._deliveries = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-ucx-deliver")
        from kvconnector.worker_side import BufferPool
        self.pool = BufferPool()

    async def _get_address(self):
        return self._ucxx.get_worker_address()

    def _run(self, coro, timeout: float | None = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def local_info(self) -> dict:
        return {"address": self.address, "tag_base": self.tag_base}

    def check_peer(self, ours: Handshake, theirs: Handshake) -> str:
        info = theirs.data_plane
        if not isinstance(info.get("address"), bytes) or not isinstance(info.get("tag_base"), int):
            return "ucx peer sent no worker address / tag base"
        return ""

    def open(self, link, ours: Handshake, theirs: Handshake, producer: bool) -> None:
        link.state["ucx_tag_base"] = int(theirs.data_plane["tag_base"])
        if not producer:
            return

        async def connect():
            addr = self._ucxx.get_ucx_address_from_buffer(theirs.data_plane["address"])
            return await self._ucxx.create_endpoint_from_worker_address(addr)
        link.state["ucx_ep"] = self._run(connect())

    def send(self, link, header: KVChunk, tensor: torch.Tensor) -> SendHandle:
        ep = link.state["ucx_ep"]
        tag = (self.tag_base << 32) | (header.seq & 0xFFFFFFFF)
        buf = _as_ucx_buffer(tensor)
        future = asyncio.run_coroutine_threadsafe(ep.send(buf, tag=tag, force_tag=True), self.loop)
        link.send(header)
        return SendHandle(future)

    def receive(self, link, header: KVChunk, body: memoryview, deliver: Deliver, fail: Fail) -> None:
        tag = (link.state["ucx_tag_base"] << 32) | (header.seq & 0xFFFFFFFF)
        try:
            dest = self.pool.get(header.tensor.shape, empty_like_meta(header.tensor, "meta").dtype,
                                 torch.device(self.config.device))
        except (ValueError, RuntimeError) as exc:
            fail(exc)
            return
        future = asyncio.run_coroutine_threadsafe(self._ucxx.recv(_as_ucx_buffer(dest), tag), self.loop)

        deliver_when_landed(future, dest, deliver, fail, self.pool, self._deliveries)

    def close_link(self, link) -> None:
        ep = link.state.pop("ucx_ep", None)
        if ep is not None:
            self.loop.call_soon_threadsafe(_abort_quietly, ep)

    def close(self) -> None:
        self._deliveries.shutdown(wait=False)
