"""One decoder for Llama, Qwen2 and Mistral: they differ only in flags that `ArchConfig` carries.

- Qwen2: bias on the q/k/v projections (`qkv_bias`), usually tied embeddings.
- Llama: `attention_bias` puts a bias on q/k/v and o; llama3 rope scaling lives in the rotary table.
- Mistral: a sliding window, handled by capping the context at the window (engine/checkpoint.py).

Module and parameter names follow Hugging Face's (`model.layers.3.self_attn...`), except the fused projections
`qkv_proj` and `gate_up_proj`, which the loader fills from the separate tensors.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pdserve.engine.attention_metadata import AttentionMetadata
from pdserve.engine.checkpoint import ArchConfig
from pdserve.engine.models.layers import Attention, Embedding, GatedMLP, Linear, RMSNorm, build_cos_sin_cache
from pdserve.kernels import dispatch


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.self_attn = Attention(arch, dtype, device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)
        self.mlp = GatedMLP(arch, dtype, device)

    def forward(self, positions, hidden, residual, kv_cache, meta, cos_sin_cache):
        """Pre-norm block. The residual add is fused into each norm, so (hidden, residual) travel together."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, cos_sin_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device):
        super().__init__()
        self.embed_tokens = Embedding(arch.vocab_size, arch.hidden_size, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(arch, dtype, device) for _ in range(arch.num_hidden_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype, device)


class LlamaForCausalLM(nn.Module):
    """model(input_ids [T], positions [T], kv_caches (one [2, N, B, Hk, D] per layer), attn_meta) -> hidden [T, H];
    compute_logits(hidden [n, H]) -> [n, V] float32."""

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device):
        super().__init__()
        self.arch = arch
        self.model = DecoderModel(arch, dtype, device)
        self.lm_head = None if arch.tie_word_embeddings else Linear(arch.hidden_size, [arch.vocab_size], False,
                                                                    dtype, device)
        cache = build_cos_sin_cache(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling,
                                    device=device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_meta: AttentionMetadata, layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """layer_done(i) runs once layer i's K/V writes are queued on the stream (the KV producer pushes there)."""
        hidden = self.model.embed_tokens(input_ids)
        residual = None
        for index, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_meta, self.cos_sin_cache)
            if layer_done is not None:
                layer_done(index)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype (as Hugging Face computes them), returned as float32."""
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return dispatch.linear(hidden, head).float()
