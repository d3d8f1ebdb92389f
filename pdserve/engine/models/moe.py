"""A sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks top-k experts per token, each a gated MLP.

The experts' weights are stacked, gate and up fused: `w13` [E, 2I, H] and `w2` [E, H, I], so one fused kernel
(kernels/fused_moe.py) runs every expert of a layer in one launch per GEMM. Checkpoints store one tensor per expert
and projection in the family's own names (Mixtral's w1/w3/w2, Qwen's gate_proj/up_proj/down_proj); `hf_names`
tells the loader which rows of which stacked parameter each of them fills. Under tensor parallelism every rank
holds every expert, cut along its intermediate width (w1/w3 rows, w2 columns), and the layer's output is
all-reduced, as a dense MLP's is.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.engine.models.layers import Linear, empty_param
from pdserve.engine.tensor_parallel import TPGroup, shard
from pdserve.kernels import dispatch
from pdserve.kernels.fused_moe import select_experts

EXPERT_NAMES = {  # model_type -> our stacked parameter -> the checkpoint's projection per row block
    "mixtral": {"w13": ("w1", "w3"), "w2": ("w2",)},
    "qwen3_moe": {"w13": ("gate_proj", "up_proj"), "w2": ("down_proj",)},
}
BLOCK_NAME = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}  # the layer attribute holding the experts


class FusedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int, names: dict, dtype: torch.dtype, device,
                 tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        start, inter = shard(inter, tp.rank, tp.size)
        self.num_experts = num_experts
        self.hf_names = names
        self.row_splits = {"w13": (inter, inter), "w2": (hidden,)}  # rows of each expert's slice, per HF tensor
        cut = tp.size > 1
        self.hf_cuts = {"w13": [(0, start, inter) if cut else None] * 2, "w2": [(1, start, inter) if cut else None]}
        self.w13 = empty_param(num_experts, 2 * inter, hidden, dtype=dtype, device=device)
        self.w2 = empty_param(num_experts, hidden, inter, dtype=dtype, device=device)


class SparseMoE(nn.Module):
    """x [T, H] -> sum over the top-k experts of weight * expert(x). Routing in fp32 as Hugging Face does it."""

    def __init__(self, arch, dtype: torch.dtype, device, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp or TPGroup.single()
        moe = arch.moe
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate = Linear(arch.hidden_size, [moe.num_experts], False, dtype, device)
        self.experts = FusedExperts(moe.num_experts, arch.hidden_size, moe.intermediate_size,
                                    EXPERT_NAMES[arch.model_type], dtype, device, self.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        return self.tp.all_reduce(dispatch.fused_moe(x, self.experts.w13, self.experts.w2, weights, ids))
