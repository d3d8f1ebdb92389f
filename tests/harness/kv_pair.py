"""A command-driven KV node in its own process (multiprocessing spawn), for the two-process tests.

The test process sends (command, kwargs) over a Pipe and gets ("ok", value) or ("error", text) back. A node
holds one connector (producer or consumer) at a time; `open` replaces it, so one pair of processes can run
several dtypes and layouts. Blocks come from the engine's BlockPool (accounting: free + used + cached ==
total), with the free queue shuffled so block ids are random and disjoint per request.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import threading
import time
import traceback

import pytest


class Node:
    def __init__(self):
        self.conn = None
        self.pool = None
        self.blocks: dict[str, list] = {}  # rid -> Block objects held
        self.finished: dict[str, dict] = {}  # rid -> {"ok", "cause", "free_calls", ...}
        self.free_calls: dict[str, int] = {}
        self.lock = threading.Lock()
        self.cached_for: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------ setup

    def open(self, role: str, cfg: dict, num_blocks: int, seed: int, device: str = "cpu"):
        import torch

        from pdserve.engine.block_pool import BlockPool
        from pdserve.kvconnector.connector import ConnectorConfig

        if self.conn is not None:
            self.conn.close()
        random.seed(seed)
        torch.manual_seed(seed)
        dtype = getattr(torch, cfg["dtype"])
        shape = (cfg["num_layers"], 2, num_blocks, cfg["block_size"], cfg["num_kv_heads"], cfg["head_dim"])
        self.cache = (
            torch.randn(shape, dtype=torch.float32).to(dtype)
            if role == "producer"
            else torch.zeros(shape, dtype=dtype)
        ).to(device)
        if self.cache.is_cuda:
            torch.cuda.set_device(self.cache.device)
        self.pool = BlockPool(num_blocks, enable_caching=False, block_size=cfg["block_size"])
        everything = self.pool.allocate(num_blocks)
        random.shuffle(everything)
        for b in everything:
            self.pool.free([b])
        self.blocks, self.finished, self.free_calls = {}, {}, {}
        config = ConnectorConfig(**cfg)
        self.role = role
        if role == "producer":
            from pdserve.kvconnector.producer import KVProducer

            self.conn = KVProducer(config, self.cache, on_complete=self._on_complete)
            return None
        from pdserve.kvconnector.consumer import KVConsumer

        self.conn = KVConsumer(config, self.cache, on_complete=self._on_complete)
        return list(self.conn.address)

    def _on_free(self, rid):
        with self.lock:
            self.free_calls[rid] = self.free_calls.get(rid, 0) + 1
            blocks = self.blocks.pop(rid, None)
            if blocks:
                self.pool.free(blocks)

    def _on_complete(self, rid, ok, timings):
        with self.lock:
            self.finished.setdefault(rid, {"ok": ok, "cause": timings.get("cause"), "calls": 0})
            self.finished[rid]["calls"] += 1
        # a producer's blocks are free once its writes are done; a consumer's stay with the request unless it
        # failed
        if self.role == "producer" or not ok:
            self._on_free(rid)

    # ----------------------------------------------------------------------------------------------- commands

    def reserve(self, rid: str, num_tokens: int, num_cached: int = 0):
        """Consumer: allocate the blocks for prompt blocks num_cached.. and expect them (the decode node's
        part)."""
        with self.lock:
            blocks = self.pool.allocate(-(-num_tokens // self.pool.block_size) - num_cached)
            self.blocks[rid] = blocks
        ids = [b.block_id for b in blocks]
        self.conn.expect(rid, ids)
        return {"remote": ids, "num_cached": num_cached}

    def wait_finished(self, rid: str, timeout: float = 10.0):
        """Consumer: block until rid completed or failed here (the producer finishes at its own fence, before
        the consumer has read its Done). -> the finished record, or None on timeout."""
        deadline = time.monotonic() + timeout
        while rid not in self.finished and time.monotonic() < deadline:
            time.sleep(0.002)
        return self.finished.get(rid)

    def forget(self, rid: str):
        """Consumer: the node gives up on rid and frees its blocks."""
        self.conn.forget(rid)
        self._on_free(rid)

    def transfer(
        self,
        rid: str,
        address,
        num_tokens: int,
        chunk_tokens: int,
        remote: list,
        num_cached: int = 0,
        layer_delay: float = 0.0,
        background: bool = False,
    ):
        """Producer: bind the consumer's blocks, then 'prefill' in chunks of chunk_tokens, saving each layer;
        wait for completion."""
        from pdserve.kvconnector.producer import StepProgress

        with self.lock:
            blocks = self.pool.allocate(-(-num_tokens // self.pool.block_size))
            self.blocks[rid] = blocks
        local = [b.block_id for b in blocks]

        def run():
            try:
                self.conn.bind(rid, tuple(address), num_tokens, remote, num_cached)
            except Exception as exc:
                with self.lock:  # a refused handshake never reached the connector: give the blocks back here
                    held = self.blocks.pop(rid, None) if rid not in self.finished else None
                    if held:
                        self.pool.free(held)
                return {"error": str(exc)}
            done = 0
            while done < num_tokens:
                done = min(done + chunk_tokens, num_tokens)
                self.conn.begin_step()
                self.conn.start_step([StepProgress(rid, done, local, done == num_tokens)])
                for layer in range(self.conn.config.num_layers):
                    if layer_delay:
                        time.sleep(layer_delay)
                    self.conn.save_layer(layer)
                self.conn.end_step()
            return {"local": local, "remote": remote, "num_cached": num_cached}

        if background:
            threading.Thread(target=run, daemon=True).start()
            return local
        out = run()
        deadline = time.monotonic() + self.conn.config.timeout + 5
        while "error" not in out and rid not in self.finished and time.monotonic() < deadline:
            time.sleep(0.005)
        return out

    def inject(self, address, kind: str) -> bool:
        """Producer: put a malformed frame on the live, handshaken link to address; whether the link then
        closed (within a bounded wait: the consumer refuses it and hangs up)."""
        from tests.harness.bad_frames import bad_frame

        link = self.conn.connect(tuple(address))
        link.send_raw(bad_frame(kind))
        deadline = time.monotonic() + 5
        while not link.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        return link.closed

    def block_bytes(self, block_ids: list[int]) -> bytes:
        """Raw bytes of blocks (all layers, K and V) in the given order."""
        import torch

        ids = torch.tensor(block_ids, dtype=torch.int64, device=self.cache.device)
        return self.cache.index_select(2, ids).contiguous().view(torch.uint8).cpu().numpy().tobytes()

    def state(self):
        pool = self.pool
        pool.check_invariants()
        m = self.conn.metrics
        return {
            "free": pool.num_free,
            "used": pool.num_used,
            "cached": pool.num_cached,
            "total": pool.num_blocks,
            "held": {rid: len(b) for rid, b in self.blocks.items()},
            "finished": dict(self.finished),
            "free_calls": dict(self.free_calls),
            "active": self.conn.scheduler.active(),
            "drops": {
                r: m.drops(r) for r in ("truncated", "version", "oversized", "hmac", "schema", "garbage")
            },
            "failures": {
                c: m.failures(c) for c in ("timeout", "peer_lost", "remote_abort", "abort", "error")
            },
            "metrics": self.metrics_text(),
        }

    def metrics_text(self) -> dict:
        from prometheus_client import generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        text = generate_latest(self.conn.metrics.registry).decode()
        return {
            s.name: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if not s.labels.get("cause") and not s.labels.get("reason") and "le" not in s.labels
        }

    def pid(self):
        return os.getpid()


def serve(pipe, env: dict) -> None:
    os.environ.update(env)
    logging.basicConfig(level=logging.WARNING, format=f"[{os.getpid()}] %(name)s %(levelname)s %(message)s")
    node = Node()
    while True:
        try:
            cmd, kwargs = pipe.recv()
        except EOFError:
            break
        if cmd == "exit":
            pipe.send(("ok", None))
            break
        try:
            pipe.send(("ok", getattr(node, cmd)(**kwargs)))
        except Exception:
            pipe.send(("error", traceback.format_exc()))
    if node.conn is not None:
        node.conn.close()


class NodeHandle:
    """The test side of one node process."""

    def __init__(self, env: dict | None = None):
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        env = dict(env or {})
        self.proc = ctx.Process(target=serve, args=(child, env), daemon=True)
        self.proc.start()
        child.close()

    def call(self, cmd: str, timeout: float = 30.0, **kwargs):
        self.pipe.send((cmd, kwargs))
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"node did not answer {cmd} in {timeout}s")
        status, value = self.pipe.recv()
        if status != "ok":
            raise RuntimeError(f"node failed {cmd}:\n{value}")
        return value

    def start(self, cmd: str, **kwargs) -> None:
        """Send a command without waiting for its answer (collect it with result())."""
        self.pipe.send((cmd, kwargs))

    def result(self, timeout: float = 30.0):
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"no answer in {timeout}s")
        status, value = self.pipe.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.pipe.send(("exit", {}))
                self.pipe.poll(5)
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(5)
        self.kill()


@pytest.fixture
def pair():
    """A producer and a consumer process, closed after the test (import this fixture into the test module)."""
    prod, cons = NodeHandle(), NodeHandle()
    try:
        yield prod, cons
    finally:
        prod.close()
        cons.close()
