"""Tensor parallelism: which slice of each weight and KV head a rank holds, and the group's collectives.

Megatron's split, as vLLM makes it:
- column-parallel (q/k/v, gate/up, each expert's w1/w3): a rank holds a contiguous run of output rows of each
  fused part; its activations stay split and nothing is communicated;
- row-parallel (o_proj, down_proj, each expert's w2): a rank holds the matching input columns; the partial
  outputs are summed with one all-reduce, and a bias is added once, after it;
- vocab-parallel embedding and LM head: a rank holds ceil(V / N) vocabulary rows (the last rank's tail is
  padding). The embedding's lookups of other ranks' rows give 0 and an all-reduce completes them; the LM
  head's partial logits are all-gathered;
- attention heads split evenly; KV heads too when N <= num_kv_heads, else each rank holds the one KV head its
  query heads read, so N / num_kv_heads ranks hold a copy of each (replicated KV heads);
- norms and the MoE router are replicated.

`TPGroup` wraps one process group (gloo on CPU, NCCL on GPUs). Every rank runs the same forward with the same
inputs, so each collective is called in the same order everywhere.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

import torch

from pdserve.wire.errors import ConfigError

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)  # a first step may compile kernels on every rank


def shard(total: int, rank: int, size: int) -> tuple[int, int]:
    """(start, length) of rank's even share of `total` (total % size == 0 is checked at load)."""
    length = total // size
    return rank * length, length


def kv_head_range(num_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """(first KV head, count) a rank holds: an even share, or the single head its query heads read."""
    if size <= num_kv_heads:
        return shard(num_kv_heads, rank, size)
    return rank * num_kv_heads // size, 1


def vocab_range(vocab: int, rank: int, size: int) -> tuple[int, int, int]:
    """(start, real rows, padded rows) of a rank's vocabulary shard."""
    padded = -(-vocab // size)
    start = rank * padded
    return start, max(0, min(padded, vocab - start)), padded


def check_divisible(arch, size: int) -> None:
    """ConfigError unless the model's heads and widths split evenly over `size` ranks."""
    if size < 1:
        raise ConfigError(f"--tensor-parallel-size must be at least 1, got {size}")
    if size == 1:
        return
    hk = arch.num_key_value_heads
    widths = {
        "num_attention_heads": arch.num_attention_heads,
        "intermediate_size": arch.intermediate_size,
    }
    if arch.moe is not None:
        widths["the experts' intermediate size"] = arch.moe.intermediate_size
    for name, value in widths.items():
        if value % size:
            raise ConfigError(f"--tensor-parallel-size {size} does not divide {name} ({value})")
    if hk % size and size % hk:
        raise ConfigError(
            f"--tensor-parallel-size {size} and num_key_value_heads {hk}: one must divide the other "
            "(KV heads are split, or replicated when there are fewer than ranks)"
        )


@dataclass
class TPGroup:
    """One rank's view of its group. size 1 (`single()`): every collective is the identity."""

    rank: int = 0
    size: int = 1
    pg: Optional[object] = None  # torch.distributed.ProcessGroup{Gloo,NCCL}
    backend: str = ""

    @classmethod
    def single(cls) -> "TPGroup":
        return cls()

    @classmethod
    def join(cls, store, rank: int, size: int, device: torch.device) -> "TPGroup":
        """Join the group through rank 0's rendezvous store (rank 0 passes the TCPStore it serves, the others
        its (host, port)): NCCL on a GPU, gloo on CPU (or when $PDSERVE_TP_BACKEND=gloo, which lets two ranks
        share one GPU, as NCCL refuses)."""
        import os

        import torch.distributed as dist

        if isinstance(store, tuple):
            store = dist.TCPStore(*store, size, False, timeout=COLLECTIVE_TIMEOUT)
            store.set(f"pdserve/up/{rank}", "1")
        backend = os.environ.get("PDSERVE_TP_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = COLLECTIVE_TIMEOUT
            pg = dist.ProcessGroupNCCL(store, rank, size, options)
        else:
            pg = dist.ProcessGroupGloo(store, rank, size, COLLECTIVE_TIMEOUT)
        group = cls(rank, size, pg, backend)
        group._store = store  # rank 0 serves it; it must outlive the group
        return group

    @property
    def graphable(self) -> bool:
        """CUDA graphs can capture this group's collectives (NCCL's can, gloo's run on the host)."""
        return self.size == 1 or self.backend == "nccl"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place."""
        if self.size > 1:
            self.pg.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest `value` over the ranks (the KV cache's block count must agree)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        device = "cuda" if self.backend == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return int(t.item())
