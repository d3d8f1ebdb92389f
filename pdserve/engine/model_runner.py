"""Owns the model and its paged KV cache on one device; runs one scheduler step's forward pass.

The runner knows nothing of requests' lifecycles: it gets the step's chunks (engine/batch_inputs.py) and says
which rows to produce logits for. Sampling and bookkeeping stay in the engine core.
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
    def __init__(self, config: EngineConfig):
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
        started = time.perf_counter()
        self.model, self.arch = load_model(
            config.model.model,
            self.dtype,
            self.device,
            load_format=config.model.load_format,
            seed=config.model.seed,
        )
        log.info("model loaded in %.1f s", time.perf_counter() - started)
        if self.device.type == "cuda":
            self._profile_peak_memory()
        self.num_blocks = decide_num_blocks(self.arch, config.cache, self.dtype, self.device)
        self.kv_cache = allocate_kv_cache(
            self.arch, self.block_size, self.num_blocks, self.dtype, self.device
        )
        self.kv_caches = list(self.kv_cache.unbind(0))  # per layer [2, N, B, Hk, D] views
        self.graphs = None
        # The torch references (PDSERVE_KERNELS=ref, for debugging) sync the host and size tensors from
        # their contents, which a CUDA graph cannot capture: they run eager.
        if self.device.type == "cuda" and not config.enforce_eager and dispatch.kernels_mode() != "ref":
            from pdserve.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_batch=config.scheduler.max_num_seqs)

    @torch.inference_mode()
    def _profile_peak_memory(self) -> None:
        """A forward over a full token budget, so the KV cache is sized around the activations' peak."""
        tokens = self.config.scheduler.max_num_batched_tokens
        blocks = -(-tokens // self.block_size)
        scratch = allocate_kv_cache(self.arch, self.block_size, blocks, self.dtype, self.device)
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
        the same forward's hidden states."""
        graphable = self.on_layer_done is None and all(c.is_decode for c in chunks)
        if self.graphs is not None and graphable and self.graphs.fits(len(chunks)):
            logits = self.graphs.run(chunks)
            return logits[sample_rows] if len(sample_rows) != len(chunks) else logits
        hidden, last = self._forward(chunks, self.kv_caches)
        if prompt_rows is not None:
            prompt_rows.compute(hidden, self.model.compute_logits, self.arch.vocab_size)
        rows = last[torch.as_tensor(sample_rows, dtype=torch.long, device=last.device)]
        return self.model.compute_logits(hidden[rows])
