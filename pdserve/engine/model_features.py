"""What each model family adds to the Llama decoder, read from config.json into `ArchConfig` fields.

The families differ in a handful of switches, so one decoder (engine/models/decoder.py) serves them all:

- **qwen3**: RMSNorm over each head's q and k before the rotary embedding (`qk_norm`), no q/k/v bias.
- **gemma2**: sliding-window layers alternating with global ones, starting with a sliding one; norms that
  scale by (1 + w); four norms per layer (after attention and after the MLP too); embeddings scaled by
  sqrt(hidden_size); GeGLU (`gelu_pytorch_tanh`); attention scaled by `query_pre_attn_scalar ** -0.5`;
  soft-capped attention scores and final logits.
- **gemma3** (text, `Gemma3ForCausalLM`): Gemma 2 without the soft caps (unless set) plus `qk_norm`; five
  sliding layers to one global (`sliding_window_pattern`), and a separate rope base for the sliding layers
  (`rope_local_base_freq`), the rope scaling applying to global layers only.
- **mixtral, qwen3_moe**: the MLP is a mixture of experts with top-k softmax routing (`MoEConfig`); Qwen3-MoE
  adds `qk_norm`, `norm_topk_prob` and dense layers (`mlp_only_layers`, `decoder_sparse_step`).

Which layers slide comes from `layer_types` when config.json has it (transformers 5 writes it), else from each
family's own rule, as transformers derives it.
"""

from __future__ import annotations

from dataclasses import dataclass

SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA = ("gemma2", "gemma3_text")
# HF's config classes default tie_word_embeddings to True here, and hub configs omit the key
TIED_BY_DEFAULT = GEMMA
QK_NORM = ("qwen3", "qwen3_moe", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's
    renormalize: bool  # divide the top-k weights by their sum (Mixtral always; Qwen3-MoE if norm_topk_prob)
    sparse_layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP (False)


def activation(config: dict) -> str:
    """Gemma names it hidden_activation (and its old configs say gelu_pytorch_tanh as hidden_act too)."""
    if config.get("model_type") in GEMMA:
        return str(config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh")
    return str(config.get("hidden_act", "silu"))


def layer_windows(config: dict, num_layers: int) -> tuple[int, ...]:
    """Per layer: 0 for full attention, else the sliding window in tokens (a key at j is seen from p when
    p - window < j <= p)."""
    window = _window(config)
    if not window:
        return (0,) * num_layers
    types = config.get("layer_types") or _default_layer_types(config, num_layers)
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted({t for t in types if t not in (SLIDING, FULL)})
    if unknown:
        raise ValueError(f"layer_types holds {', '.join(unknown)} (supported: {SLIDING}, {FULL})")
    return tuple(window if t == SLIDING else 0 for t in types)


def _window(config: dict) -> int:
    model_type = config.get("model_type")
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not config.get("use_sliding_window", False):
        return 0
    window = int(config.get("sliding_window") or 0)
    if window < 0:
        raise ValueError(f"sliding_window must be positive (or null for none), got {window}")
    return window


def _at_least_one(config: dict, key: str, default: int) -> int:
    value = int(config.get(key, default))
    if value < 1:
        raise ValueError(f"{key} must be at least 1, got {value}")
    return value


def _default_layer_types(config: dict, num_layers: int) -> list[str]:
    model_type = config.get("model_type")
    if model_type == "gemma2":
        return [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
    if model_type == "gemma3_text":
        pattern = _at_least_one(config, "sliding_window_pattern", 6)
        return [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    if model_type in ("qwen2", "qwen3"):
        first = int(config.get("max_window_layers", num_layers))
        return [SLIDING if i >= first else FULL for i in range(num_layers)]
    return [SLIDING] * num_layers  # Mistral, Mixtral, Qwen3-MoE: the window applies to every layer


def local_rope_theta(config: dict) -> float | None:
    """Gemma 3's sliding layers' rope base (None: every layer uses rope_theta), from either spelling."""
    if config.get("model_type") != "gemma3_text":
        return None
    params = config.get("rope_parameters") or {}
    local = params.get(SLIDING) if isinstance(params.get(SLIDING), dict) else {}
    return float(local.get("rope_theta", config.get("rope_local_base_freq", 10000.0)))


def global_rope_params(config: dict) -> dict:
    """The rope parameters of full-attention layers: Gemma 3 under transformers 5 nests them by layer type."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(FULL), dict):
        return params[FULL]
    return params or {}


def attention_scale(config: dict, head_dim: int) -> float:
    if config.get("model_type") in GEMMA:
        return float(config.get("query_pre_attn_scalar", head_dim)) ** -0.5
    return head_dim**-0.5


def moe_config(config: dict, num_layers: int) -> MoEConfig | None:
    """None for a dense model (Qwen3-MoE with num_experts 0 is one, as in HF). Values a forward would trip on
    are refused here, at load."""
    model_type = config.get("model_type")
    if model_type == "mixtral":
        moe = MoEConfig(
            num_experts=int(config["num_local_experts"]),
            top_k=int(config["num_experts_per_tok"]),
            intermediate_size=int(config["intermediate_size"]),
            renormalize=True,
            sparse_layers=(True,) * num_layers,
        )
    elif model_type == "qwen3_moe" and int(config.get("num_experts") or 0) > 0:
        step = _at_least_one(config, "decoder_sparse_step", 1)
        dense = set(config.get("mlp_only_layers") or [])
        moe = MoEConfig(
            num_experts=int(config["num_experts"]),
            top_k=int(config["num_experts_per_tok"]),
            intermediate_size=int(config["moe_intermediate_size"]),
            renormalize=bool(config.get("norm_topk_prob", False)),
            sparse_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        )
    else:
        return None
    if not 0 < moe.top_k <= moe.num_experts:
        raise ValueError(f"num_experts_per_tok must be 1..{moe.num_experts} (the experts), got {moe.top_k}")
    if activation(config) != "silu":  # the fused MoE kernel computes SwiGLU experts
        raise ValueError(f"the experts' hidden_act must be silu, got {activation(config)!r}")
    return moe


def family_fields(config: dict, num_layers: int, head_dim: int) -> dict:
    """The ArchConfig fields beyond Llama's, for this config.json."""
    model_type = config.get("model_type")
    gemma = model_type in GEMMA
    return dict(
        layer_windows=layer_windows(config, num_layers),
        hidden_act=activation(config),
        qk_norm=model_type in QK_NORM,
        norm_offset=1.0 if gemma else 0.0,
        sandwich_norms=gemma,
        embed_scale=float(config["hidden_size"]) ** 0.5 if gemma else 1.0,
        attn_scale=attention_scale(config, head_dim),
        attn_softcap=float(config.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(config.get("final_logit_softcapping") or 0.0),
        local_rope_theta=local_rope_theta(config),
        moe=moe_config(config, num_layers),
    )
