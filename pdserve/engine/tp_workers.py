"""The ranks 1..N-1 of a tensor-parallel engine: one spawned process each, driven by rank 0 over a pipe.

vLLM's multiprocess executor is the model: the scheduler runs once, in the node's process, which is also
rank 0; each step rank 0 sends every worker the step's chunks (and how to run them) and runs them itself.
The ranks then run the same forward, meeting in its all-reduces, and only rank 0 samples.

A worker sends rank 0 its KV cache once, at start (a CPU cache travels as shared memory, a GPU cache as a CUDA
IPC handle), so the node's KV connector can read and write every rank's heads. A worker that fails exits: its
sockets close, so rank 0's next collective raises instead of hanging, and the rank is reported lost
(`TPWorkers.lost`). A worker whose rank 0 dies reads EOF from its pipe, or an error from its collective, and
exits too.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import time
import traceback
from dataclasses import replace
from typing import Optional

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import export_cuda_ipc
from pdserve.wire.errors import ConfigError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a 70B shard and capturing its graphs


class RankLost(RuntimeError):
    """A tensor-parallel rank died or failed: the engine cannot run another step."""

    fatal = True  # the engine loop does not retry the step (engine/engine_loop.py)


def rank_device(config: EngineConfig, device: torch.device, rank: int) -> str:
    """Rank r's device, from rank 0's: cuda:N+r on GPUs (rank 0's one when $PDSERVE_TP_BACKEND=gloo), else
    the CPU."""
    if device.type != "cuda":
        return str(device)
    size = config.parallel.tensor_parallel_size
    if os.environ.get("PDSERVE_TP_BACKEND") == "gloo":
        return str(device)
    visible = torch.cuda.device_count()
    if visible < size:
        raise ConfigError(
            f"--tensor-parallel-size {size} needs {size} GPUs, {visible} visible (NCCL refuses two ranks on "
            "one GPU; PDSERVE_TP_BACKEND=gloo runs them on one, for tests)"
        )
    return f"cuda:{(device.index or 0) + rank}"


def share_cpu_threads(size: int) -> None:
    """N ranks on one CPU each take 1/N of its cores for their matmuls: the ranks run at once and wait on each
    other at every all-reduce, so oversubscribed threads slow every step (4x on 2 cores)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


class TPWorkers:
    """Rank 0's handle on the other ranks. `runner_class` (ModelRunner, passed in so that this module does not
    import the one that imports it) is what each worker builds."""

    def __init__(self, config: EngineConfig, store_port: int, device: torch.device, runner_class):
        ctx = torch.multiprocessing.get_context("spawn")
        size = config.parallel.tensor_parallel_size
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs = []
        self.lost: Optional[str] = None
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(
                    runner_class,
                    replace(config, device=rank_device(config, device, rank)),
                    rank,
                    store_port,
                    child,
                ),
                name=f"pdserve-tp-rank{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def wait_started(self, store) -> None:
        """Until every worker's process is up and at the rendezvous (each sets its key in rank 0's store), so
        a worker that fails on start is reported at once instead of after the collective timeout."""
        for rank, conn in enumerate(self.conns, start=1):
            while not store.check([f"pdserve/up/{rank}"]):
                if conn.poll(0.05):
                    kind, payload = self._recv(rank, conn)
                    raise RankLost(f"tensor-parallel rank {rank} failed to start:\n{payload}")
                if not self.procs[rank - 1].is_alive():
                    raise RankLost(f"tensor-parallel rank {rank} exited on start ({self._exit_of(rank)})")

    def gather_caches(self) -> list[tuple[torch.Tensor, dict | None]]:
        """Each worker's KV cache [L, 2, N, B, h, D] and, on a GPU, its CUDA IPC export
        (engine/kv_cache.py), once they have loaded (rank order, from rank 1)."""
        caches = []
        for rank, conn in enumerate(self.conns, start=1):
            if not conn.poll(START_TIMEOUT_S):
                raise RankLost(f"tensor-parallel rank {rank} did not start within {START_TIMEOUT_S:.0f} s")
            kind, payload = self._recv(rank, conn)
            if kind != "ready":
                raise RankLost(f"tensor-parallel rank {rank} failed to start:\n{payload}")
            caches.append(payload)
        return caches

    def _recv(self, rank: int, conn):
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise RankLost(f"tensor-parallel rank {rank} exited ({self._exit_of(rank)})") from None

    def _exit_of(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        proc.join(0.5)
        return f"exit code {proc.exitcode}" if proc.exitcode is not None else "still running"

    def send(self, message: tuple) -> None:
        """Hand every worker one command; raises RankLost once any rank is gone."""
        if self.lost is None:
            for rank, conn in enumerate(self.conns, start=1):
                try:
                    conn.send(message)
                except (OSError, ValueError):
                    self.lost = f"tensor-parallel rank {rank} is gone ({self._exit_of(rank)})"
                    break
        if self.lost is not None:
            raise RankLost(self.lost)

    def mark_lost(self, cause: BaseException) -> str:
        """After a collective failed: name the rank at fault. When one rank dies its peers' collectives fail
        too, and they exit after reporting that on their pipes; the rank that died unreported (killed,
        crashed) is the one to name, else the first that reported an error of its own."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and all(p.is_alive() for p in self.procs):
            time.sleep(0.02)
        time.sleep(0.2)  # the peers' reports and exits follow the first death
        silent, reported = [], []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns, strict=True), start=1):
            if proc.is_alive():
                continue
            report = self._report(conn)
            if report is None:
                silent.append(f"tensor-parallel rank {rank} died (exit code {proc.exitcode})")
            else:
                last = report.strip().splitlines()[-1] if report.strip() else ""
                reported.append(f"tensor-parallel rank {rank} failed: {last}")
        found = silent or reported or [f"a tensor-parallel collective failed: {cause}"]
        self.lost = found[0]
        return self.lost

    @staticmethod
    def _report(conn) -> Optional[str]:
        """A dead worker's ("error", traceback), if it sent one."""
        try:
            if conn.poll(0):
                kind, payload = conn.recv()
                return str(payload) if kind == "error" else None
        except (EOFError, OSError):
            pass
        return None

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self.conns:
            conn.close()


def worker_main(runner_class, config: EngineConfig, rank: int, store_port: int, conn) -> None:
    """A worker process: build rank `rank`'s runner, hand rank 0 its cache, then run each step it is sent."""
    logging.basicConfig(
        level=os.environ.get("PDSERVE_LOG_LEVEL", "WARNING"),
        format=f"%(asctime)s tp-rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    share_cpu_threads(config.parallel.tensor_parallel_size)
    try:
        runner = runner_class(config, rank=rank, store_port=store_port)
        export = export_cuda_ipc(runner.kv_caches) if runner.device.type == "cuda" else None
        conn.send(("ready", (runner.kv_cache, export)))
        while True:
            try:
                message = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if message[0] == "stop":
                break
            runner.run_step(*message[1:])
    except BaseException:  # noqa: BLE001 - reported to rank 0, then this rank exits so no collective waits on it
        try:
            conn.send(("error", traceback.format_exc()))
        except (OSError, ValueError):
            pass
        log.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)  # at once: the process group's teardown could wait on the peers
