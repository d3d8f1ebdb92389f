"""bench/kv_transfer.py's two sides: a spawned process holding one paged KV cache and one connector (producer
or consumer), driven over a pipe by the benchmark (`Proc(device, env).call("cmd", ...)`)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import statistics
import threading
import time
import traceback


class Node:
    """One side, driven over a Pipe: ('cmd', kwargs) -> ('ok', value) | ('error', traceback)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.conn = None
        self.landed: dict[str, float] = {}
        self.exposed_gpu: dict[str, float] = {}
        self.done = threading.Event()

    def open(self, role, transport, layout, num_blocks, address=None, secret="bench", shuffle=True, tp=1):
        """tp > 1: the cache split over `tp` rank caches by KV head, as a tensor-parallel node holds it (all
        on this device), handed to the connector as a HeadLayout."""
        from pdserve.kvconnector.connector import ConnectorConfig

        torch = self.torch
        if self.conn is not None:
            self.conn.close()
        shape = (
            layout["num_layers"],
            2,
            num_blocks,
            layout["block_size"],
            layout["num_kv_heads"],
            layout["head_dim"],
        )
        dtype = getattr(torch, layout["dtype"])
        self.cache = (
            torch.randn(shape, device=self.device).to(dtype)
            if role == "producer"
            else torch.zeros(shape, dtype=dtype, device=self.device)
        )
        # options: cuda_ipc:torch -> {"copy": "torch"}; cuda_ipc:triton:1024 -> also {"block_words": 1024}
        name, _, options = transport.partition(":")
        copy, _, block_words = options.partition(":")
        extra = {"copy": copy} if copy else {}
        if block_words:
            extra["block_words"] = int(block_words)
        cfg = ConnectorConfig(
            model="bench-shape",
            kv_connector=name,
            secret=secret,
            timeout=30.0,
            extra=extra,
            **layout,
        )
        self.layout = self.cache if tp == 1 else split_by_heads(self.cache, tp)
        self.blocks = list(range(num_blocks))
        if shuffle:  # scattered blocks on both sides: no plane may gain from runs a busy cache would not have
            random.Random(0).shuffle(self.blocks)
        if role == "consumer":
            from pdserve.kvconnector.consumer import KVConsumer

            self.conn = KVConsumer(cfg, self.layout, on_complete=self._complete)
            return list(self.conn.address)
        from pdserve.kvconnector.producer import KVProducer

        self.conn = KVProducer(cfg, self.layout, on_complete=self._complete)
        self.address = tuple(address)
        self.conn.connect(self.address)
        return None

    def expect(self, rid, tokens):
        """Consumer: reserve blocks for tokens (a shuffled, scattered set, as a busy pool hands out)."""
        from pdserve.wire.sliding_window import shipped_from

        config = self.conn.config
        n = -(-tokens // config.block_size)
        blocks = self.blocks[len(self.blocks) - n :]
        self.conn.expect(rid, blocks, shipped_from(config.layer_windows, tokens, config.block_size))
        return blocks

    def source_blocks(self, tokens):
        """Producer: the blocks a push of `tokens` reads."""
        return self.blocks[: -(-tokens // self.conn.config.block_size)]

    def checksum(self, blocks):
        """float64 sum of every head of these blocks, every layer, read back from the rank caches: the
        producer's source blocks and the consumer's landed ones must agree."""
        from pdserve.kvconnector.head_layout import HeadLayout

        layout = HeadLayout.of(self.layout)
        ids = self.torch.tensor(blocks, dtype=self.torch.int64, device=self.device)
        return sum(float(layout.gather(i, ids).double().sum()) for i in range(len(layout.layers)))

    def _complete(self, rid, ok, timings):
        self.landed[rid] = time.monotonic() if ok else -1.0
        if "exposed_gpu_s" in timings:
            self.exposed_gpu[rid] = timings["exposed_gpu_s"] * 1e3
        self.done.set()

    def wait_landed(self, rid, timeout=60.0):
        deadline = time.monotonic() + timeout
        while rid not in self.landed and time.monotonic() < deadline:
            time.sleep(0.0005)
        t = self.landed.pop(rid, None)
        if t is None or t < 0:
            raise RuntimeError(f"{rid} did not land ({t})")
        return t

    def calibrate(self, layer_ms, tokens):
        """Matmul reps per layer that take layer_ms on this device (0 on CPU: it sleeps instead)."""
        torch = self.torch
        self.reps, self.layer_ms = 0, layer_ms
        if self.device.type != "cuda" or layer_ms <= 0:
            return 0
        self.a = torch.randn(tokens, 4096, device=self.device, dtype=torch.bfloat16)
        self.w = torch.randn(4096, 4096, device=self.device, dtype=torch.bfloat16)
        for _ in range(3):
            self.a @ self.w
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            self.a @ self.w
        end.record()
        end.synchronize()
        self.reps = max(1, round(layer_ms / (start.elapsed_time(end) / 20)))
        return self.reps

    def _compute(self):
        if self.reps:
            for _ in range(self.reps):
                self.a @ self.w
        elif self.layer_ms > 0:
            time.sleep(self.layer_ms / 1000)

    def push(self, rid, tokens, overlapped, remote):
        """Bind the consumer's blocks, then save every layer (after simulated compute if overlapped).
        -> (t_start, t_last, exposed ms on the device clock or None)."""
        from pdserve.kvconnector.producer import StepProgress

        torch, conn = self.torch, self.conn
        n = -(-tokens // conn.config.block_size)
        self.done.clear()
        conn.bind(rid, self.address, tokens, remote, 0)
        conn.begin_step()
        conn.start_step([StepProgress(rid, tokens, self.blocks[:n], True)])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t_start = time.monotonic()
        last, saving = None, 0.0
        for layer in range(conn.config.num_layers):
            if overlapped:
                self._compute()
                if layer == conn.config.num_layers - 1 and self.device.type == "cuda":
                    last = torch.cuda.Event()
                    last.record()
            t0 = time.perf_counter()
            conn.save_layer(layer)
            saving += time.perf_counter() - t0
        conn.end_step()
        self.save_layer_us = saving / conn.config.num_layers * 1e6
        if last is not None:
            last.synchronize()
        t_last = time.monotonic()
        if not self.done.wait(60):
            raise RuntimeError(f"{rid}: producer never completed")
        return t_start, t_last, self.exposed_gpu.pop(rid, None), self.save_layer_us

    # ---- ceilings
    def raw_store(self):
        import torch.distributed as dist

        self.store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
        return int(self.store.port)

    def raw_nccl(self, rank, port, nbytes, iters):
        """One buffer of nbytes, rank 0 -> rank 1, iters times back to back; -> ms per send (median)."""
        import torch.distributed as dist

        torch = self.torch
        store = self.store if rank == 1 else dist.TCPStore("127.0.0.1", port, None, False)
        pg = dist.ProcessGroupNCCL(dist.PrefixStore("raw", store), rank, 2)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        times = []
        for i in range(iters + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            (pg.send([buf], 1, 0) if rank == 0 else pg.recv([buf], 0, 0)).wait()
            torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def copy_ms(self, nbytes, iters):
        torch = self.torch
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        times = []
        for i in range(iters + 2):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def close(self):
        if self.conn is not None:
            self.conn.close()


def split_by_heads(cache, tp: int):
    """A [L, 2, N, B, H, D] cache as the HeadLayout of `tp` ranks' copies of their heads."""
    from pdserve.engine.tensor_parallel import kv_head_range
    from pdserve.kvconnector.head_layout import HeadLayout

    heads = cache.shape[4]
    ranges = [kv_head_range(heads, r, tp) for r in range(tp)]
    ranks = [cache[:, :, :, :, first : first + n].contiguous() for first, n in ranges]
    return HeadLayout.of_ranks(ranks, ranges, heads)


def _serve(pipe, device, env):
    os.environ.update(env)
    node = None
    while True:
        try:
            cmd, kwargs = pipe.recv()
        except EOFError:
            return
        if cmd == "exit":
            if node is not None:
                node.close()
            pipe.send(("ok", None))
            return
        try:
            node = node or Node(device)
            pipe.send(("ok", getattr(node, cmd)(**kwargs)))
        except Exception:
            pipe.send(("error", traceback.format_exc()))


class Proc:
    """A spawned node process; `serve` (default _serve) is its main loop, e.g. one that instruments it
    first."""

    def __init__(self, device: str, env: dict, serve=None):
        ctx = mp.get_context("spawn")
        self.device = device
        self.pipe, child = ctx.Pipe()
        self.p = ctx.Process(target=serve or _serve, args=(child, device, env), daemon=True)
        self.p.start()

    def send(self, cmd, **kw):
        self.pipe.send((cmd, kw))

    def get(self, timeout=300):
        if not self.pipe.poll(timeout):
            raise TimeoutError("worker did not answer")
        status, value = self.pipe.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def call(self, cmd, **kw):
        self.send(cmd, **kw)
        return self.get()

    def close(self):
        try:
            self.send("exit")
            self.get(30)
        except Exception:
            pass
        if self.p.is_alive():
            self.p.kill()
        self.p.join(5)
