"""Owns the model and its paged KV cache on one device; runs one scheduler step's forward pass.

The runner knows nothing of requests' lifecycles: it gets the step's chunks (engine/batch_inputs.py) and says
which rows to produce logits for. Sampling and bookkeeping stay in the engine core.

With --tensor-parallel-size N the engine's runner is rank 0: it starts ranks 1..N-1 (engine/tp_workers.py),
each a ModelRunner of its own in its own process, and forwards every step to them before running it itself.
Each rank holds its slice of the weights and a KV cache of only its own KV heads; `rank_caches` (rank 0) holds
them all, for the node's KV connector.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from pdserve.engine.batch_inputs import build_batch_inputs
from pdserve.engine.checkpoint import load_arch_config
from pdserve.engine.config import DTYPE_ALIASES, EngineConfig
from pdserve.engine.kv_cache import allocate_kv_cache, decide_num_blocks
from pdserve.engine.models.loader import load_model
from pdserve.engine.prompt_logprobs import PromptRows
from pdserve.engine.scheduler_output import ScheduledRequest
from pdserve.engine.tensor_parallel import TPGroup, check_divisible, kv_head_range
from pdserve.kernels import dispatch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from pdserve.wire.errors import ConfigError

        raise ConfigError(f"--device {name}: no CUDA device is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    """--dtype as vLLM reads it. auto: the checkpoint's own dtype (config.json's torch_dtype) on a GPU,
    where a float32 (or unnamed) checkpoint runs in bfloat16 as vLLM downcasts it; on CPU always float32
    (the reference kernels and the transformers oracle compute in float32, and CPU half-precision matmuls
    are slow)."""
    name = DTYPE_ALIASES.get(name, name)
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    saved = str(checkpoint_dtype or "").removeprefix("torch.")
    saved = DTYPE_ALIASES.get(saved, saved)
    return _DTYPES[saved] if saved in ("float16", "bfloat16") else torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, store_port: int | None = None):
        """rank 0 (the engine's) starts the other ranks when config asks for tensor parallelism; a worker
        passes its rank and the port of rank 0's rendezvous store."""
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(
            config.model.dtype, self.device, load_arch_config(config.model.model).torch_dtype
        )
        self.block_size = config.cache.block_size
        # Called with each layer's index once its K/V writes are queued; the prefill node's KV producer sets
        # it.
        self.on_layer_done: Callable[[int], None] | None = None
        self.workers = None
        self.tp = self._join_group(rank, store_port)
        try:
            self._build()
            self.rank_caches = [self.kv_cache]
            self.rank_exports: list[dict | None] = [None]  # a worker's CUDA IPC export of its cache
            if self.workers is not None:
                for cache, export in self.workers.gather_caches():
                    self.rank_caches.append(cache)
                    self.rank_exports.append(export)
        except BaseException:
            self.close()
            raise

    def _join_group(self, rank: int, store_port: int | None) -> TPGroup:
        size = self.config.parallel.tensor_parallel_size
        if size == 1:
            return TPGroup.single()
        check_divisible(load_arch_config(self.config.model.model), size)  # before any process starts
        if rank == 0:
            import torch.distributed as dist

            from pdserve.engine.tensor_parallel import COLLECTIVE_TIMEOUT
            from pdserve.engine.tp_workers import TPWorkers, share_cpu_threads

            if self.device.type == "cpu":
                share_cpu_threads(size)

            store = dist.TCPStore(
                "127.0.0.1", 0, size, True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False
            )
            self.workers = TPWorkers(self.config, store.port, self.device, type(self))
            self.workers.wait_started(store)
            return TPGroup.join(store, rank, size, self.device)
        return TPGroup.join(("127.0.0.1", store_port), rank, size, self.device)

    def _build(self) -> None:
        config = self.config
        started = time.perf_counter()
        self.model, self.arch = load_model(
            config.model.model,
            self.dtype,
            self.device,
            load_format=config.model.load_format,
            seed=config.model.seed,
            tp=self.tp,
            progress=self.tp.rank == 0,  # one progress bar per node
        )
        log.info("model loaded in %.1f s", time.perf_counter() - started)
        self.kv_heads = kv_head_range(self.arch.num_key_value_heads, self.tp.rank, self.tp.size)
        if self.device.type == "cuda":
            self._profile_peak_memory()
        blocks = decide_num_blocks(self.arch, config.cache, self.dtype, self.device, self.kv_heads[1])
        self.num_blocks = self.tp.min_int(blocks)  # every rank's cache must hold the same block ids
        self.kv_cache = allocate_kv_cache(
            self.arch, self.block_size, self.num_blocks, self.dtype, self.device, self.kv_heads[1]
        )
        self.kv_caches = list(self.kv_cache.unbind(0))  # per layer [2, N, B, Hk, D] views
        self.graphs = None
        # The torch references (PDSERVE_KERNELS=ref, for debugging) sync the host and size tensors from
        # their contents, which a CUDA graph cannot capture: they run eager. So do gloo's collectives.
        graphs = not config.enforce_eager and dispatch.kernels_mode() != "ref" and self.tp.graphable
        if self.device.type == "cuda" and graphs:
            from pdserve.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_batch=config.scheduler.max_num_seqs)

    def close(self) -> None:
        """Stop the other ranks (rank 0); a no-op without tensor parallelism."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    @torch.inference_mode()
    def _profile_peak_memory(self) -> None:
        """A forward over a full token budget, so the KV cache is sized around the activations' peak."""
        tokens = self.config.scheduler.max_num_batched_tokens
        blocks = -(-tokens // self.block_size)
        scratch = allocate_kv_cache(
            self.arch, self.block_size, blocks, self.dtype, self.device, self.kv_heads[1]
        )
        chunk = ScheduledRequest(
            "profile", [0] * tokens, 0, list(range(blocks)), is_decode=False, samples=False
        )
        self._forward([chunk], list(scratch.unbind(0)))
        del scratch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward(self, chunks: list[ScheduledRequest], kv_caches) -> tuple[torch.Tensor, torch.Tensor]:
        batch = build_batch_inputs(chunks, self.block_size, self.device)
        hidden = self.model(
            batch.input_ids, batch.positions, kv_caches, batch.attn, layer_done=self.on_layer_done
        )
        return hidden, batch.last_token_index

    @torch.inference_mode()
    def execute(
        self, chunks: list[ScheduledRequest], sample_rows: list[int], prompt_rows: PromptRows | None = None
    ) -> torch.Tensor:
        """Run the step; return float32 logits [len(sample_rows), vocab] for the last token of those
        chunks. prompt_rows (engine/prompt_logprobs.py), when some prefill chunk asks, gets its records from
        the same forward's hidden states. Raises RankLost once a tensor-parallel rank is gone."""
        graphable = self.on_layer_done is None and all(c.is_decode for c in chunks)
        use_graph = self.graphs is not None and graphable and self.graphs.fits(len(chunks))
        if self.workers is None:
            return self.run_step(chunks, sample_rows, prompt_rows, use_graph)
        # the other ranks compute the same rows (their collectives must match ours) but keep no records
        rows_only = (
            None
            if prompt_rows is None
            else PromptRows(prompt_rows.rows, prompt_rows.targets, [], prompt_rows.widths)
        )
        self.workers.send(("step", chunks, sample_rows, rows_only, use_graph))
        try:
            return self.run_step(chunks, sample_rows, prompt_rows, use_graph)
        except Exception as exc:
            from pdserve.engine.tp_workers import RankLost

            raise RankLost(self.workers.mark_lost(exc)) from exc

    @torch.inference_mode()
    def run_step(
        self,
        chunks: list[ScheduledRequest],
        sample_rows: list[int],
        prompt_rows: PromptRows | None,
        use_graph: bool,
    ) -> torch.Tensor:
        """This rank's share of a step, as rank 0 decided to run it."""
        if use_graph:
            logits = self.graphs.run(chunks)
            return logits[sample_rows] if len(sample_rows) != len(chunks) else logits
        hidden, last = self._forward(chunks, self.kv_caches)
        if prompt_rows is not None:
            prompt_rows.compute(hidden, self.model.compute_logits, self.arch.vocab_size)
        rows = last[torch.as_tensor(sample_rows, dtype=torch.long, device=last.device)]
        return self.model.compute_logits(hidden[rows])
