"""ucx data plane (ucxx): UCX picks cuda_ipc, NVLink, RDMA or TCP; on CPU tests `UCX_TLS=tcp UCX_NET_DEVICES=lo`.

Setup at handshake: the consumer's handshake carries its UCX worker address; the producer makes one endpoint to
it per link. Each producer process picks a random 31-bit tag base (in its handshake); chunk `seq` goes out with
tag `base << 32 | seq` and the consumer posts a worker-level tag receive for exactly that tag when the chunk's
header arrives on the control link, so the bytes may arrive before or after the header.
Many sends stay in flight (the producer's max_inflight), which is what makes per-layer messages fast on one GPU
(DESIGN.md: 32 x 8 MB all in flight 1.3 ms vs 4.1 ms one by one); receive buffers come from a pool so UCX's
registration cache sees the same memory again.
All ucxx calls run on one asyncio loop thread per process; deliveries (scatters) run on another thread so they
never stall UCX's completions. Completion is signalled (ucxx Python futures, set by UCX's notifier thread), never
polled: a polling loop holds the GIL and every hand-off between our threads then waits for the interpreter's
switch interval. UCX progress runs on ucxx's own thread: spinning (thread-polling) on a GPU, epoll on CPU;
$UCXPY_PROGRESS_MODE overrides.
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
                                   torch_dtype)
from kvconnector.wire import Handshake, KVChunk

log = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_progress: dict = {}  # how ucxx was initialised in this process: progress_mode, python_future

# ucxx progress modes whose request completion can be signalled by a Python future (the notifier thread).
_FUTURE_MODES = ("thread", "thread-polling")


def progress_mode_for(device: str) -> str:
    """$UCXPY_PROGRESS_MODE, else thread-polling on a GPU (the UCX progress thread spins on its own core, without
    the GIL, so a cuda_ipc completion is seen at once) and thread on CPU (epoll; cores are scarce there)."""
    return os.environ.get("UCXPY_PROGRESS_MODE") or ("thread" if device.startswith("cpu") else "thread-polling")


def _ucx_loop(progress_mode: str = "thread") -> asyncio.AbstractEventLoop:
    """One event loop thread per process, with ucxx initialised on it (the first caller's progress mode wins).

    Request completion is signalled, never polled: with ucxx's default (no Python futures) every awaited request
    is a coroutine spinning on `asyncio.sleep(0)`, so while any transfer is in flight the loop thread holds the GIL
    almost all the time and every other thread of the process (the sender, the link readers, the deliveries)
    waits up to the interpreter's switch interval (5 ms) for it at each hand-off (the likely bulk of the ~25 ms
    fixed cost per request measured on one H100). With Python futures the loop sleeps until UCX's notifier thread
    wakes it with the finished requests."""
    global _loop
    with _loop_lock:
        if _loop is None:
            import ucxx  # noqa: F401  (imported here: it pulls CUDA libraries)
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="kv-ucx-loop", daemon=True).start()
            env_future = os.environ.get("UCXPY_ENABLE_PYTHON_FUTURE")
            python_future = progress_mode in _FUTURE_MODES and env_future != "0"

            async def init():
                import ucxx
                ucxx.init(progress_mode=progress_mode, enable_python_future=python_future or None)
            asyncio.run_coroutine_threadsafe(init(), loop).result(30)
            _progress.update(progress_mode=progress_mode, python_future=python_future)
            if not python_future:
                log.warning("ucxx progress mode %s without Python futures: request completion is polled on the "
                            "event loop (slow hand-offs between threads)", progress_mode)
            _loop = loop
        return _loop


def ucx_progress() -> dict:
    """How this process's ucxx runs: {"progress_mode": ..., "python_future": bool} ({} before the first use)."""
    return dict(_progress)


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
        self.loop = _ucx_loop(progress_mode_for(config.device))
        import ucxx
        self._ucxx = ucxx
        self.address = bytes(self._run(self._get_address()))
        self.tag_base = random.getrandbits(31) | 1
        self._deliveries = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-ucx-deliver")
        from kvconnector.worker_side import BufferPool
        self.pool = BufferPool()
        self._device = torch.device(config.device)

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
            dest = self.pool.get(header.tensor.shape, torch_dtype(header.tensor.dtype), self._device)
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
