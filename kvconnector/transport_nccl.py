"""nccl data plane: one NCCL process group per producer/consumer pair, made at handshake; GPU to GPU only.

Each consumer process hosts one TCPStore (its port in the handshake); a pair's group lives under a prefix made of
the producer's engine id and a nonce from its handshake, so one store serves every producer. Rank 0 is the
producer, rank 1 the consumer. A one-element send/recv at `open` initialises the communicator eagerly, so a
broken pairing fails the handshake instead of the first request.
NCCL point-to-point is ordered per pair: the producer issues sends in chunk order on one thread, the consumer
posts receives in header order on the link's reader thread, so no tags are needed.
Two ranks on one GPU are refused by NCCL ("Duplicate GPU detected"), so the handshake refuses that pairing
up front and points to `ucx` (cuda_ipc), which is the GPU transport when prefill and decode share a device.
Test hook: `extra={"backend": "gloo"}` runs the same pairing, ordering and completion logic on CPU over Gloo.
"""
from __future__ import annotations

import concurrent.futures
import datetime
import logging
import random

import torch
import torch.distributed as dist

from kvconnector.transport import (DataPlane, DataPlaneConfig, Deliver, Fail, SendHandle, deliver_when_landed,
                                   empty_like_meta)
from kvconnector.wire import Handshake, KVChunk

log = logging.getLogger(__name__)

SAME_GPU = ("nccl cannot pair a prefill and a decode node on the same GPU (NCCL refuses two ranks on one "
            "device: 'Duplicate GPU detected'); use kv_connector 'ucx', which moves KV over cuda_ipc there")


class NcclDataPlane(DataPlane):
    name = "nccl"

    def __init__(self, config: DataPlaneConfig):
        super().__init__(config)
        device = torch.device(config.device)
        self.backend = config.extra.get("backend", "nccl")
        if self.backend == "gloo":
            pass
        elif device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError("kv_connector 'nccl' moves GPU memory only; on CPU use 'tcp' (or 'ucx')")
        if self.backend == "nccl" and not dist.is_nccl_available():
            raise ValueError("this torch build has no NCCL; use kv_connector 'ucx' or 'tcp'")
        self.device = device
        timeout = datetime.timedelta(seconds=float(config.extra.get("nccl_init_timeout", 60)))
        self.timeout = timeout
        self.store = dist.TCPStore(config.ip, 0, None, True, timeout=timeout, wait_for_workers=False)
        self.nonce = random.getrandbits(48)
        self._deliveries = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-nccl-deliver")
        self._waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-nccl-wait")
        from kvconnector.worker_side import BufferPool
        self.pool = BufferPool()

    def local_info(self) -> dict:
        return {"store_host": self.config.ip, "store_port": int(self.store.port), "nonce": self.nonce}

    def check_peer(self, ours: Handshake, theirs: Handshake) -> str:
        if self.backend == "gloo":
            pass
        elif not theirs.device_uuid:
            return "the peer's KV cache is not on a GPU; nccl needs both sides on GPUs (use tcp or ucx)"
        elif theirs.device_uuid == ours.device_uuid:
            return SAME_GPU
        info = theirs.data_plane
        if not all(isinstance(info.get(k), int) for k in ("store_port", "nonce")):
            return "nccl peer sent no store port / nonce"
        return ""

    def open(self, link, ours: Handshake, theirs: Handshake, producer: bool) -> None:
        if producer:  # the consumer hosts the store; the pair's prefix comes from the producer's handshake
            info = theirs.data_plane
            store = dist.TCPStore(info["store_host"], info["store_port"], None, False, timeout=self.timeout)
            prefix = f"kv/{ours.engine_id}/{self.nonce}"
        else:
            store = self.store
            prefix = f"kv/{theirs.engine_id}/{theirs.data_plane['nonce']}"
        rank = 0 if producer else 1
        pg = self._new_group(dist.PrefixStore(prefix, store), rank)
        probe = torch.zeros(1, device=self.device)
        work = pg.send([probe], 1, 0) if producer else pg.recv([probe], 0, 0)
        work.wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        link.state["nccl_pg"] = pg
        link.state["nccl_store"] = store
        log.info("nccl group for link %s ready (rank %d)", link.name, rank)

    def _new_group(self, store, rank: int):
        if self.backend == "gloo":
            return dist.ProcessGroupGloo(store, rank, 2, self.timeout)
        torch.cuda.set_device(self.device)
        return dist.ProcessGroupNCCL(store, rank, 2)

    def send(self, link, header: KVChunk, tensor: torch.Tensor) -> SendHandle:
        pg = link.state["nccl_pg"]
        link.send(header)
        work = pg.send([tensor], 1, 0)
        return SendHandle(_to_concurrent(work, tensor, self._waiter, self.device))

    def receive(self, link, header: KVChunk, body: memoryview, deliver: Deliver, fail: Fail) -> None:
        pg = link.state["nccl_pg"]
        try:
            dtype = empty_like_meta(header.tensor, "meta").dtype
        except ValueError as exc:  # header checked on decode; an unknown dtype still must not desync the pair
            fail(exc)
            dtype = torch.uint8
        dest = self.pool.get(header.tensor.shape, dtype, self.device)
        future = _to_concurrent(pg.recv([dest], 0, 0), dest, self._waiter, self.device)

        deliver_when_landed(future, dest, deliver, fail, self.pool, self._deliveries)

    def close_link(self, link) -> None:
        pg = link.state.pop("nccl_pg", None)
        if pg is not None:
            for name in ("abort", "shutdown"):
                fn = getattr(pg, name, None)
                if fn is not None:
                    try:
                        fn()
                        break
                    except Exception as exc:
                        log.debug("nccl %s failed: %s", name, exc)

    def close(self) -> None:
        self._deliveries.shutdown(wait=False)
        self._waiter.shutdown(wait=False)


def _to_concurrent(work, keep, waiter: concurrent.futures.Executor, device: torch.device
                   ) -> concurrent.futures.Future:
    """A c10d Work -> a concurrent Future done when the transfer finished (keeps `keep` alive till then).

    NCCL's Work has a future completed from a CUDA event; Gloo's has none, so a waiter thread blocks on it
    (point-to-point work completes in issue order, so one thread in order loses nothing)."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def done(fut) -> None:
        try:
            fut.value()
            out.set_result(keep.numel())
        except Exception as exc:
            out.set_exception(exc)
    try:
        work.get_future().add_done_callback(done)
        return out
    except RuntimeError:  # "Work::getFuture not implemented"
        pass

    def wait() -> None:
        try:
            if device.type == "cuda":  # wait() only orders a stream after the transfer: sync a private one
                stream = torch.cuda.Stream(device)
                with torch.cuda.stream(stream):
                    work.wait()
                stream.synchronize()
            else:
                work.wait()
            out.set_result(keep.numel())
        except Exception as exc:
            out.set_exception(exc)
    waiter.submit(wait)
    return out
