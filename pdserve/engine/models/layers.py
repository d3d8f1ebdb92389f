"""The building blocks of the decoder: linear layers, RMSNorm, the rotary table, paged attention, the gated MLP.

Parameters are allocated with torch.empty in the final dtype and device (no random init, no meta round trip):
the loader fills every one of them and checks none is left. Fused projections (q|k|v, gate|up) record how their
rows split, so the loader can place Hugging Face's separate tensors into them. Under tensor parallelism
(engine/tensor_parallel.py) each module holds its rank's slice and records, in `hf_cuts`, which slice of
Hugging Face's tensor that is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.checkpoint import RopeScaling
from pdserve.engine.tensor_parallel import TPGroup, kv_head_range, shard, vocab_range
from pdserve.kernels import dispatch

Cut = tuple[int, int, int]  # (dim, start, length) of a Hugging Face tensor that a rank holds


def empty_param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b. `splits` lists the row counts of the tensors fused into W (one entry when not fused).
    `cuts`, per fused part, is the rows of Hugging Face's tensor this rank holds (column parallel; a bias is
    cut alike), None when it holds them all."""

    def __init__(self, in_features: int, splits: list[int], bias: bool, dtype: torch.dtype, device,
                 cuts: list[Cut | None] | None = None):
        super().__init__()
        self.splits = tuple(splits)
        self.weight = empty_param(sum(splits), in_features, dtype=dtype, device=device)
        self.bias = empty_param(sum(splits), dtype=dtype, device=device) if bias else None
        parts = list(cuts) if cuts else [None] * len(splits)
        self.hf_cuts = {"weight": parts, "bias": parts}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.linear(x, self.weight, self.bias)


def column_cuts(splits: list[int], tp: TPGroup) -> tuple[list[int], list[Cut | None]]:
    """A fused projection's parts split evenly over the ranks: (this rank's row counts, their cuts)."""
    if tp.size == 1:
        return list(splits), [None] * len(splits)
    ranges = [shard(n, tp.rank, tp.size) for n in splits]
    return [length for _, length in ranges], [(0, start, length) for start, length in ranges]


class RowParallelLinear(Linear):
    """A projection whose input is split over the ranks: this rank holds W's matching columns; the partial
    products are summed with one all-reduce and the bias added once, after it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device,
                 tp: TPGroup):
        start, length = shard(in_features, tp.rank, tp.size)
        super().__init__(length, [out_features], bias, dtype, device)
        self.tp = tp
        self.hf_cuts = {"weight": [(1, start, length) if tp.size > 1 else None], "bias": [None]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return dispatch.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(dispatch.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class Embedding(nn.Module):
    """Vocabulary-parallel: this rank holds rows [start, start + padded) (the tail past the vocabulary is zero
    padding); lookups of other ranks' ids give 0 here and the all-reduce completes them."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp or TPGroup.single()
        self.start, self.real_rows, padded = vocab_range(vocab_size, self.tp.rank, self.tp.size)
        self.weight = empty_param(padded, hidden_size, dtype=dtype, device=device)
        if padded > self.real_rows:
            self.weight.data[self.real_rows:].zero_()
        self.hf_cuts = {"weight": [(0, self.start, self.real_rows) if self.tp.size > 1 else None]}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.real_rows)
        hidden = F.embedding(torch.where(mine, local, 0), self.weight)
        return self.tp.all_reduce(hidden * mine.unsqueeze(-1).to(hidden.dtype))


class RMSNorm(nn.Module):
    """`offset` is added to the checkpoint's weight on load: Gemma's norms scale by (1 + w), and folding the 1 into
    the weight once lets every family share one kernel. Such a weight is kept in float32, where HF computes
    1 + w and the product (kernels/rms_norm.py): in bf16, 1 + w alone would lose w's low bits."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = empty_param(hidden_size, dtype=torch.float32 if offset else dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual), Hugging Face's rounding."""
        return dispatch.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, with linear or llama3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    blend = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * slowed / scaling.factor + blend * slowed
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, blended, slowed)


def build_cos_sin_cache(head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None,
                        device=None) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of each position's angles in the first half, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)


class Attention(nn.Module):
    """Grouped-query attention over the paged KV cache: decodes go to the decode kernel, chunks to the prefill one.
    `window` > 0 makes it a sliding-window layer; qk_norm and softcap are the Qwen3 / Gemma variations."""

    def __init__(self, arch, window: int, dtype: torch.dtype, device, tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        self.head_dim = arch.head_dim
        self.num_heads = arch.num_attention_heads // tp.size
        first_kv, self.num_kv_heads = kv_head_range(arch.num_key_value_heads, tp.rank, tp.size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = arch.attn_scale or self.head_dim ** -0.5
        self.window, self.softcap = window, arch.attn_softcap
        cuts = None
        if tp.size > 1:
            kv_cut = (0, first_kv * self.head_dim, self.kv_size)
            cuts = [(0, tp.rank * self.q_size, self.q_size), kv_cut, kv_cut]
        self.qkv_proj = Linear(arch.hidden_size, [self.q_size, self.kv_size, self.kv_size], arch.qkv_bias,
                               dtype, device, cuts)
        self.o_proj = RowParallelLinear(arch.num_attention_heads * self.head_dim, arch.hidden_size, arch.o_bias,
                                        dtype, device, tp)
        if arch.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, dtype, device, arch.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps, dtype, device, arch.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, cos_sin_cache: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], kv_cache [2, N, B, Hk, D] -> [T, H]."""
        T = hidden.shape[0]
        # 1. Project; q, k, v stay strided views of one buffer (the kernels take row strides).
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # per head, before rotary (copies q and k out of the fused buffer)
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(T, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(T, self.num_kv_heads, self.head_dim)
        # 2. Rotate q and k, and write this step's k and v into the cache: attention reads them from there.
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        dispatch.apply_rotary_and_write_kv(positions, q, k, v, k_cache, v_cache, meta.slot_mapping, cos_sin_cache)
        # 3. Attend: decode tokens first (one per sequence), then the prefill chunks.
        out = torch.empty(T, self.num_heads, self.head_dim, dtype=hidden.dtype, device=hidden.device)
        nd = meta.num_decode_tokens
        if nd > 0:
            dispatch.paged_decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                            meta.decode_seq_lens, self.scale, out=out[:nd],
                                            sliding_window=self.window, softcap=self.softcap)
        if meta.num_prefills > 0:
            dispatch.paged_prefill_attention(q[nd:], k_cache, v_cache, meta.prefill_block_tables,
                                             meta.prefill_cu_query_lens, meta.prefill_seq_lens, self.scale,
                                             out=out[nd:], sliding_window=self.window, softcap=self.softcap)
        # 4. Back to the residual stream.
        return self.o_proj(out.view(T, self.q_size))


def act_and_mul(activation: str, x: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> act(gate) * up: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh, Gemma's)."""
    if activation == "silu":
        return dispatch.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one projection."""

    def __init__(self, arch, dtype: torch.dtype, device, tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        inter = arch.intermediate_size
        self.activation = arch.hidden_act
        splits, cuts = column_cuts([inter, inter], tp)
        self.gate_up_proj = Linear(arch.hidden_size, splits, arch.mlp_bias, dtype, device, cuts)
        self.down_proj = RowParallelLinear(inter, arch.hidden_size, arch.mlp_bias, dtype, device, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.activation, self.gate_up_proj(x)))
