"""Model-shape arithmetic for the engine benchmark: parameter counts, the FLOP and bytes a step needs, and the
floors those give at the copy bandwidth and matmul rate measured in the same run.

Floors are rooflines: a step can finish no sooner than its FLOP at the matmul rate, nor sooner than the bytes
it must read at the copy rate, so its floor is the larger of the two.
- Prefill of T tokens (one sequence): every linear layer once per token, 2 FLOP per weight (the output head
  only for the last token, as the engine computes it); causal attention 2*T*(T+1)*head_dim FLOP per q head per
  layer (QK^T and PV over the T*(T+1)/2 visible pairs). the usual convention 2 * all params * T is kept in
  params as `flop_2NT` for comparison.
- Decode step of B sequences at context C: read every weight once (the embedding table only as B rows; with
  tied embeddings the table is read once, as the output head) and each sequence's K and V for C+1 tokens;
  bytes at the copy rate, where the copy rate counts read + write bytes (a read-only stream cannot beat a
  copy's total rate).
- Mixture of experts (Mixtral, Qwen3-MoE): FLOP count only the top-k experts a token runs (plus the router);
  bytes count the experts a step touches: with N tokens routed uniformly, an expert is hit with probability
  1 - (1 - k/E)^N, so a decode step at batch 1 reads k experts per layer and at batch 64 nearly all of them
  (what a trained router's load balancing aims for; random weights route about uniformly).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool
    dtype_bytes: int = 2
    experts: int = 0  # 0: a dense MLP of `intermediate`; else E experts of `intermediate` each
    experts_per_tok: int = 0

    @classmethod
    def from_config(cls, name: str, config: dict, dtype_bytes: int = 2) -> "Shape":
        heads = config["num_attention_heads"]
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        return cls(
            name=name,
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            q_heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config.get("moe_intermediate_size") or config["intermediate_size"]
            if experts
            else config["intermediate_size"],
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias")),
            dtype_bytes=dtype_bytes,
            experts=experts,
            experts_per_tok=config.get("num_experts_per_tok", 0) if experts else 0,
        )

    @classmethod
    def from_dir(cls, name: str, path: str, dtype_bytes: int = 2) -> "Shape":
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return cls.from_config(name, json.load(f), dtype_bytes)

    # parameters ------------------------------------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        """One expert's gated MLP (the dense MLP for a dense model)."""
        return 3 * self.hidden * self.intermediate

    @property
    def _attention_params(self) -> int:
        h, q, kv = self.hidden, self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + self.hidden * self.experts  # the router, for MoE

    @property
    def layer_linear_params(self) -> int:
        """Weights of the linear layers of all decoder layers one token multiplies through (its top-k experts
        only)."""
        return (self._attention_params + self.expert_params * max(self.experts_per_tok, 1)) * self.layers

    def touched_linear_params(self, tokens: int) -> float:
        """Weights of the decoder layers' linear layers a forward of `tokens` tokens reads (expected)."""
        if not self.experts:
            return self.layer_linear_params
        hit = self.experts * (1.0 - (1.0 - self.experts_per_tok / self.experts) ** tokens)
        return (self._attention_params + self.expert_params * hit) * self.layers

    @property
    def small_params(self) -> int:
        """Norm weights and biases: negligible FLOP, but read every step."""
        bias = (self.q_heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layers * (2 * self.hidden + bias) + self.hidden

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        linear = self.touched_linear_params(1 << 30)  # every expert
        return int(linear) + self.small_params + self.head_params * (1 if self.tied else 2)

    def weight_bytes(self, tokens: int) -> float:
        """Bytes of weights a forward of `tokens` tokens reads (embedding lookups aside)."""
        return (self.touched_linear_params(tokens) + self.small_params + self.head_params) * self.dtype_bytes

    @property
    def weight_bytes_per_step(self) -> float:
        """Bytes of all weights (every expert), what a long prefill reads."""
        return self.weight_bytes(1 << 30)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    # work ------------------------------------------------------------------------------------------------
    def attention_flop(self, q_len: int, context_before: int = 0) -> float:
        """Causal attention of q_len new tokens after context_before cached ones (QK^T and PV)."""
        pairs = q_len * context_before + q_len * (q_len + 1) / 2
        return 4.0 * pairs * self.head_dim * self.q_heads * self.layers

    def prefill_flop(self, tokens: int, sequences: int = 1) -> float:
        linear = 2.0 * self.layer_linear_params * tokens * sequences + 2.0 * self.head_params * sequences
        return linear + self.attention_flop(tokens) * sequences

    def prefill_floor_s(self, tokens: int, matmul_rate: float, copy_bw: float, sequences: int = 1) -> float:
        return max(
            self.prefill_flop(tokens, sequences) / matmul_rate,
            self.weight_bytes(tokens * sequences) / copy_bw,
        )

    def decode_bytes(self, batch: int, context: int) -> float:
        return self.weight_bytes(batch) + batch * (context + 1) * self.kv_bytes_per_token

    def decode_flop(self, batch: int, context: int) -> float:
        return 2.0 * (self.layer_linear_params + self.head_params) * batch + batch * self.attention_flop(
            1, context
        )

    def decode_floor_s(self, batch: int, context: int, matmul_rate: float, copy_bw: float) -> float:
        return max(
            self.decode_bytes(batch, context) / copy_bw, self.decode_flop(batch, context) / matmul_rate
        )

    def generate_floor_s(
        self, batch: int, prompt: int, output: int, matmul_rate: float, copy_bw: float
    ) -> float:
        """Prefill every prompt (as one batch), then output-1 decode steps of the whole batch."""
        total = self.prefill_floor_s(prompt, matmul_rate, copy_bw, sequences=batch)
        for step in range(output - 1):
            total += self.decode_floor_s(batch, prompt + step, matmul_rate, copy_bw)
        return total

    def describe(self) -> dict:
        return {
            "params_b": round(self.total_params / 1e9, 3),
            "active_params_b": round(
                (self.layer_linear_params + self.small_params + self.head_params) / 1e9, 3
            ),
            "experts": f"{self.experts_per_tok} of {self.experts}" if self.experts else "dense",
            "weight_gb_per_step": round(self.weight_bytes_per_step / 1e9, 3),
            "kv_kib_per_token": self.kv_bytes_per_token / 1024,
            "layers": self.layers,
            "hidden": self.hidden,
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
        }


# ------------------------------------------------------------------------------------------------ baselines

# our metric -> the Hugging Face metric measured at the same shape; the params that name a shape
BASELINES = {
    "prefill_ms": "hf_prefill_ms",
    "decode_step_ms": "hf_decode_step_ms",
    "throughput_tok_s": "hf_throughput_tok_s",
}
SHAPE_KEYS = ("model", "tokens", "batch", "context", "input_len", "output_len")


def _shape_key(rec: dict) -> tuple:
    p = rec.get("params") or {}
    return tuple(p.get(k) for k in SHAPE_KEYS)


def link_baselines(records: list[dict]) -> None:
    """Fill our records' `baseline` with transformers' figure at the same shape, and params.speedup_vs_hf.
    Time metrics: speedup = hf / ours; rates: ours / hf."""
    hf = {(r["metric"], _shape_key(r)): r for r in records if r["metric"].startswith("hf_")}
    for rec in records:
        twin = hf.get((BASELINES.get(rec["metric"]), _shape_key(rec)))
        if (
            twin is None
            or not isinstance(twin.get("value"), (int, float))
            or not isinstance(rec.get("value"), (int, float))
        ):
            continue
        rec["baseline"] = twin["value"]
        if rec["value"] and twin["value"]:
            faster = twin["value"] / rec["value"] if rec["unit"] == "ms" else rec["value"] / twin["value"]
            rec["params"]["speedup_vs_hf"] = round(faster, 3)
            if twin.get("params", {}).get("capped"):
                rec["params"]["hf_capped"] = twin["params"]["capped"]
