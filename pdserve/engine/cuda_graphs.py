"""CUDA graphs for decode-only steps: one graph per batch-size bucket, all sharing one memory pool.

A decode step of a small batch is launch-bound (hundreds of small kernels); replaying a captured graph removes
the per-kernel launch cost. Inputs live in static device buffers that each step overwrites; a batch is padded
up to its bucket with dummy rows whose slot is -1 (no cache write) and whose context is one token of block 0.
Prefill and mixed steps stay eager.
"""

from __future__ import annotations

import logging
import time

import torch

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.batch_inputs import decode_rows
from pdserve.engine.scheduler_output import ScheduledRequest

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_batch] + [max_batch]


class DecodeGraphs:
    def __init__(self, runner, max_batch: int):
        self.runner = runner
        self.device = runner.device
        self.block_size = runner.block_size
        max_len = runner.config.model.max_model_len or runner.arch.max_position_embeddings
        self.max_blocks = -(-max_len // self.block_size)
        self.buckets = batch_buckets(min(max_batch, 512))
        self.max_batch = self.buckets[-1]
        self._allocate_static_buffers()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        started = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):  # largest first: the smaller graphs fit in its pool
            self._capture(size)
        log.info(
            "captured %d decode CUDA graphs (batch %s) in %.1f s",
            len(self.buckets),
            self.buckets,
            time.perf_counter() - started,
        )

    def _allocate_static_buffers(self) -> None:
        n, dev = self.max_batch, self.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.empty_table = torch.zeros((0, 1), dtype=torch.int32, device=dev)
        self.empty_lens = torch.zeros(0, dtype=torch.int32, device=dev)
        self.zero_cu = torch.zeros(1, dtype=torch.int32, device=dev)
        # Host staging, pinned so the copies are asynchronous.
        self.host = {
            name: torch.zeros_like(t, device="cpu").pin_memory()
            for name, t in (
                ("input_ids", self.input_ids),
                ("positions", self.positions),
                ("slot_mapping", self.slot_mapping),
                ("block_tables", self.block_tables),
                ("seq_lens", self.seq_lens),
            )
        }

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            num_decode_tokens=size,
            decode_block_tables=self.block_tables[:size],
            decode_seq_lens=self.seq_lens[:size],
            prefill_block_tables=self.empty_table,
            prefill_cu_query_lens=self.zero_cu,
            prefill_seq_lens=self.empty_lens,
            max_prefill_query_len=0,
        )

    def _forward(self, size: int) -> torch.Tensor:
        model = self.runner.model
        hidden = model(
            self.input_ids[:size], self.positions[:size], self.runner.kv_caches, self._metadata(size)
        )
        return model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[size] = self._forward(size)
        self.graphs[size] = graph

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch

    def run(self, chunks: list[ScheduledRequest]) -> torch.Tensor:
        """Replay the smallest graph that holds the batch; return logits [len(chunks), vocab]."""
        n = len(chunks)
        size = next(s for s in self.buckets if s >= n)
        h = self.host
        ids, pos, slots, lens = (
            h["input_ids"].numpy(),
            h["positions"].numpy(),
            h["slot_mapping"].numpy(),
            h["seq_lens"].numpy(),
        )
        table = h["block_tables"].numpy()
        # 1. Fill the host staging rows (padding rows stay inert: slot -1, one token of context).
        rows = decode_rows(chunks, self.block_size)
        ids[n:size], pos[n:size], slots[n:size], lens[n:size] = 0, 0, -1, 1
        ids[:n], pos[:n], slots[:n], lens[:n] = (
            rows.input_ids,
            rows.positions,
            rows.slot_mapping,
            rows.seq_lens,
        )
        width = rows.block_tables.shape[1]
        table[:n, :width] = rows.block_tables
        # 2. One async copy per buffer, then replay.
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
            getattr(self, name)[:size].copy_(h[name][:size], non_blocking=True)
        self.block_tables[:n, :width].copy_(h["block_tables"][:n, :width], non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:n]
