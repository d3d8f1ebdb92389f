"""A node's KV cache across its tensor-parallel ranks: which KV heads each rank's cache holds.

Every rank's cache has the same blocks (one block table per node) but only its own heads
(engine/tensor_parallel.py): an even share, or one head held by several ranks when there are more ranks than
KV heads. The connector reads and writes a block as all of the model's heads, so the wire does not depend on
either side's TP size: a producer of any TP size sends what a consumer of any TP size expects, and each side
maps heads to its own ranks here. `gather` assembles a layer's blocks from the first rank holding each head;
`scatter` writes every rank's heads of them (each replica of a replicated head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pdserve.engine.kv_cache import import_cuda_ipc
from pdserve.kernels.dispatch import gather_blocks


@dataclass(frozen=True)
class RankCache:
    layers: list  # per layer [2, num_blocks, block_size, num_heads, head_dim]
    first_head: int
    num_heads: int
    ipc: dict | None = None  # a GPU worker's CUDA IPC export of its cache (engine/kv_cache.export_cuda_ipc)

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def layers_on(self, device: torch.device) -> list:
        """This rank's per-layer caches as tensors kernels on `device` can address: its own, or a GPU
        worker's mapped there from its CUDA IPC export (a new mapping per call: callers keep it)."""
        return self.layers if self.ipc is None else import_cuda_ipc(self.ipc, device)


class HeadLayout:
    def __init__(self, ranks: Sequence[RankCache], num_kv_heads: int):
        self.ranks = list(ranks)
        self.num_kv_heads = num_kv_heads
        self.sources = self._first_holders()

    @classmethod
    def of(cls, kv_caches, num_kv_heads: int | None = None) -> "HeadLayout":
        """A HeadLayout as is; else one rank's caches (the engine's [L, 2, N, B, h, D] tensor or a list of
        per-layer [2, N, B, h, D]) holding every head."""
        if isinstance(kv_caches, HeadLayout):
            return kv_caches
        layers = caches_by_layer(kv_caches)
        heads = layers[0].shape[3] if layers else (num_kv_heads or 0)
        return cls([RankCache(layers, 0, heads)], heads)

    @classmethod
    def of_ranks(
        cls,
        rank_caches: Sequence[torch.Tensor],
        head_ranges: Sequence[tuple[int, int]],
        num_kv_heads: int,
        exports: Sequence[dict | None] = (),
    ) -> "HeadLayout":
        """exports: a GPU worker's CUDA IPC export of its cache, per rank (None for rank 0's own)."""
        exports = list(exports) or [None] * len(rank_caches)
        ranks = [
            RankCache(caches_by_layer(c), first, n, ipc)
            for c, (first, n), ipc in zip(rank_caches, head_ranges, exports, strict=True)
        ]
        return cls(ranks, num_kv_heads)

    @property
    def tp_size(self) -> int:
        return len(self.ranks)

    @property
    def layers(self) -> list:
        """Rank 0's per-layer caches (all of them without tensor parallelism)."""
        return self.ranks[0].layers

    def _first_holders(self) -> list[RankCache]:
        """The first rank holding each head, in head order; they must cover heads 0..num_kv_heads once."""
        sources, next_head = [], 0
        for rank in self.ranks:
            if rank.first_head == next_head:
                sources.append(rank)
                next_head += rank.num_heads
        if next_head != self.num_kv_heads:
            raise ValueError(f"the ranks' KV heads cover 0..{next_head}, the model has {self.num_kv_heads}")
        return sources

    def gather(self, layer: int, block_ids: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s blocks, every head: [2, n, block_size, num_kv_heads, head_dim] on rank 0's
        device."""
        if len(self.sources) == 1:
            return gather_blocks(self.sources[0].layers[layer], block_ids)
        parts = [
            gather_blocks(r.layers[layer], block_ids.to(r.device)).to(block_ids.device) for r in self.sources
        ]
        return torch.cat(parts, dim=-2)

    def scatter(self, layer: int, block_ids: torch.Tensor, blocks: torch.Tensor) -> None:
        """blocks [2, n, block_size, num_kv_heads, head_dim] into every rank's heads of `block_ids`."""
        for rank in self.ranks:
            cache = rank.layers[layer]
            part = blocks[..., rank.first_head : rank.first_head + rank.num_heads, :]
            cache.index_copy_(1, block_ids.to(cache.device), part.to(cache.device))


def caches_by_layer(kv_caches) -> list[torch.Tensor]:
    """The engine's one tensor [L, 2, N, bs, h, d] or a list of per-layer [2, N, bs, h, d] -> list of
    layers."""
    return (
        list(kv_caches.unbind(0))
        if isinstance(kv_caches, torch.Tensor) and kv_caches.dim() == 6
        else list(kv_caches)
    )
