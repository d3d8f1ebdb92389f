"""One decoder for every family we serve: Llama, Qwen2, Mistral, Qwen3, Gemma 2 and 3, Mixtral, Qwen3-MoE.

They differ only in switches that `ArchConfig` carries (engine/model_features.py reads them):
- Qwen2: bias on the q/k/v projections (`qkv_bias`), usually tied embeddings.
- Llama: `attention_bias` puts a bias on q/k/v and o; llama3 rope scaling lives in the rotary table.
- Mistral, Gemma's local layers: a sliding window per layer (`layer_windows`), applied by the attention kernels.
- Qwen3: q/k RMSNorm per head. Gemma: (1 + w) norms, four norms a layer, GeGLU, scaled embeddings, soft caps,
  and for Gemma 3 a second rotary table for its local layers.
- Mixtral, Qwen3-MoE: experts in place of the MLP (engine/models/moe.py).

Module and parameter names follow Hugging Face's (`model.layers.3.self_attn...`), except the fused projections
`qkv_proj`, `gate_up_proj` and the stacked experts, which the loader fills from the separate tensors.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.checkpoint import ArchConfig
from pdserve.engine.models.layers import Attention, Embedding, GatedMLP, Linear, RMSNorm, build_cos_sin_cache
from pdserve.engine.models.moe import BLOCK_NAME, SparseMoE
from pdserve.engine.tensor_parallel import TPGroup
from pdserve.kernels import dispatch


def layer_window(arch: ArchConfig, index: int) -> int:
    return arch.layer_windows[index] if arch.layer_windows else 0


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, index: int, dtype: torch.dtype, device, tp: TPGroup):
        super().__init__()
        norm = lambda: RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device, arch.norm_offset)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(arch, layer_window(arch, index), dtype, device, tp)
        self.post_attention_layernorm = norm()
        if arch.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        sparse = arch.moe is not None and arch.moe.sparse_layers[index]
        self.ffn_name = BLOCK_NAME[arch.model_type] if sparse else "mlp"
        ffn = SparseMoE(arch, dtype, device, tp) if sparse else GatedMLP(arch, dtype, device, tp)
        setattr(self, self.ffn_name, ffn)
        self.sandwich = arch.sandwich_norms

    def forward(self, positions, hidden, residual, kv_cache, meta, cos_sin_cache):
        """Pre-norm block. The residual add is fused into each norm, so (hidden, residual) travel together;
        Gemma's extra norms apply to a branch's output before it joins the residual."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, cos_sin_cache)
        if self.sandwich:
            hidden = self.post_attention_layernorm(hidden)
            hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        else:
            hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = getattr(self, self.ffn_name)(hidden)
        if self.sandwich:
            hidden = self.post_feedforward_layernorm(hidden)
        return hidden, residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device, tp: TPGroup):
        super().__init__()
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype, device, tp)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, dtype, device, tp) for i in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device, arch.norm_offset)


class CausalLM(nn.Module):
    """model(input_ids [T], positions [T], kv_caches (one [2, N, B, Hk, D] per layer), attn_meta) -> hidden [T, H];
    compute_logits(hidden [n, H]) -> [n, V] float32. With tensor parallelism (`tp`) every rank runs both with
    the same inputs and gets the same result; the LM head is vocabulary-parallel like the embedding."""

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device, tp: TPGroup | None = None):
        super().__init__()
        self.arch = arch
        self.tp = tp = tp or TPGroup.single()
        self.model = DecoderModel(arch, dtype, device, tp)
        self.lm_head = None
        if not arch.tie_word_embeddings:
            embed = self.model.embed_tokens  # the head's rows split as the embedding's do
            self.lm_head = Linear(arch.hidden_size, [embed.weight.shape[0]], False, dtype, device,
                                  embed.hf_cuts["weight"])
            self.lm_head.real_rows = embed.real_rows
            self.lm_head.weight.data[embed.real_rows:].zero_()
        # Hugging Face rounds the scale to the weights' dtype before multiplying.
        self.embed_scale = torch.tensor(arch.embed_scale, dtype=dtype).item() if arch.embed_scale != 1 else None
        self.register_buffer("cos_sin_cache", build_cos_sin_cache(
            arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling, device=device),
            persistent=False)
        local = arch.local_rope_theta
        self.register_buffer("local_cos_sin_cache", None if local is None else build_cos_sin_cache(
            arch.head_dim, arch.max_position_embeddings, local, None, device=device), persistent=False)
        self.rope_of_layer = [self._rope_for(i) for i in range(arch.num_hidden_layers)]

    def _rope_for(self, index: int) -> str:
        local = self.local_cos_sin_cache is not None and layer_window(self.arch, index) > 0
        return "local_cos_sin_cache" if local else "cos_sin_cache"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_meta: AttentionMetadata, layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """layer_done(i) runs once layer i's K/V writes are queued on the stream (the KV producer pushes there)."""
        hidden = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        residual = None
        for index, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            rope = getattr(self, self.rope_of_layer[index])
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_meta, rope)
            if layer_done is not None:
                layer_done(index)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype (as Hugging Face computes them, soft-capped where the model says),
        returned as float32."""
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = dispatch.linear(hidden, head)
        if self.tp.size > 1:
            logits = self.tp.all_gather_last(logits)[:, : self.arch.vocab_size]
        cap = self.arch.final_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
