"""`pdserve make-model`: write a complete Hugging Face checkpoint folder with random weights and a real
tokenizer.

The family picks the architecture (Llama, Qwen2 with q/k/v bias, Mistral, Qwen3, Gemma 2 and 3 text, Mixtral,
Qwen3-MoE), the preset picks the shapes (tiny for tests, or real shapes for benchmarks: Qwen2.5-0.5B,
Llama-3.1-8B and 70B, Qwen3-8B, Gemma-2-9B, Qwen3-30B-A3B, Mixtral-8x7B). The tiny preset gives each family
what makes its features bite at test lengths: a sliding window of 24 tokens (not a block multiple) for Mistral
and Gemma, one local and one global layer for Gemma 3, small soft caps for Gemma 2, four experts (two per
token) for the MoE families. The folder loads offline with
`AutoModelForCausalLM` / `AutoTokenizer` and with our loader.

Weights: every tensor comes from its own generator seeded by (seed, family, tensor name), so output is
deterministic (byte for byte) and independent of write order. Projections keep unit variance (std
1/sqrt(fan_in)), so every layer moves the residual stream and a wrong attention or a mis-mapped weight changes
the output; norm weights and biases are random (not 1 and 0) so a loader that skipped them would be caught.
Embeddings have std 0.02 as trained models do (with tied weights a large embedding makes every token predict
itself); the head gives logits a std of about 4 (`LM_HEAD_GAIN`; tied models get that scale from the final
norm weight). Greedy output is then varied, with a median top-1 margin of 0.6-1 logit. Margins and numerical
noise scale together, so no random init makes bf16 tokens immune to near-ties: measured on the Qwen2.5-0.5B
shape, two bf16 implementations (eager vs sdpa attention) disagree on about 5% of argmaxes. bf16 token checks
must tolerate positions where the reference's top-2 gap is tiny. Large presets are written tensor by tensor
into <=2 GB shards, a few tensors generated ahead on worker threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, replace

from pdserve.wire.errors import ConfigError

FAMILIES = {  # family -> (architectures[0], model_type)
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
GEMMA = ("gemma2", "gemma3")
MOE = ("mixtral", "qwen3_moe")
MAX_SHARD_BYTES = 2 << 30
LM_HEAD_GAIN = 4.0  # logits' std, in units, for a unit-rms final hidden state
EMBED_STD = (
    0.02  # small, as trained models have: with tied weights a large one makes every token repeat itself
)
NORM_WEIGHT_STD = 0.1
BIAS_STD = 0.1


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = None  # None: the family's default
    rope_scaling: dict | None = None
    tie_word_embeddings: bool | None = None  # None: tied for qwen2 and gemma only
    dtype: str = "bfloat16"
    sliding_window: int = 4096  # Mistral's and Gemma's local layers'
    num_experts: int = 0  # MoE families: experts per layer, chosen per token, each expert's MLP width
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0
    tiny: bool = False  # small caps and a short window, so every family feature shows at test lengths


LLAMA3_ROPE_SCALING = {  # Llama 3.1's long-context rope (8B and 70B alike)
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
PRESETS = {
    "tiny": Preset(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        vocab_size=1024,
        max_position_embeddings=2048,
        dtype="float32",
        sliding_window=24,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        tiny=True,
    ),
    "qwen2.5-0.5b": Preset(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": Preset(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rope_scaling=LLAMA3_ROPE_SCALING,
    ),
    "qwen3-8b": Preset(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "gemma-2-9b": Preset(
        hidden_size=3584,
        num_hidden_layers=42,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        intermediate_size=14336,
        vocab_size=256000,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
    ),
    "qwen3-30b-a3b": Preset(
        hidden_size=2048,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=6144,
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
    ),
    "mixtral-8x7b": Preset(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=32000,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=14336,
    ),
}
# Llama 3.1 70B: 8B's layout at twice the width (64 heads, still 8 KV heads) and 80 layers.
PRESETS["llama-3.1-70b"] = replace(
    PRESETS["llama-3.1-8b"],
    hidden_size=8192,
    num_hidden_layers=80,
    num_attention_heads=64,
    intermediate_size=28672,
)
FAMILY_ROPE_THETA = {
    "llama": 500000.0,
    "qwen2": 1000000.0,
    "mistral": 1000000.0,
    "qwen3": 1000000.0,
    "gemma2": 10000.0,
    "gemma3": 1000000.0,
    "mixtral": 1000000.0,
    "qwen3_moe": 1000000.0,
}


def build_config(family: str, preset: Preset, dtype: str) -> dict:
    """config.json as the hub ships it (legacy `rope_theta`/`rope_scaling`/`torch_dtype` keys)."""
    from pdserve.tools.make_tokenizer import family_token_ids

    ids = family_token_ids(family)
    arch, model_type = FAMILIES[family]
    # Gemma ties its head, but a tied random head under Gemma's sqrt(hidden) embedding scale makes every token
    # predict itself: the tiny Gemma models are untied, the real shapes tied.
    tied_family = family == "qwen2" or (family in GEMMA and not preset.tiny)
    tied = preset.tie_word_embeddings if preset.tie_word_embeddings is not None else tied_family
    config = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "head_dim": preset.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": preset.max_position_embeddings,
        "rms_norm_eps": preset.rms_norm_eps,
        "rope_theta": preset.rope_theta or FAMILY_ROPE_THETA[family],
        "rope_scaling": preset.rope_scaling,
        "vocab_size": preset.vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    config.update(_family_config(family, preset))
    return config


def _family_config(family: str, preset: Preset) -> dict:
    """config.json keys beyond Llama's, as the family's hub checkpoints spell them."""
    layers = preset.num_hidden_layers
    if family == "llama":
        return dict(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if family in ("qwen2", "qwen3"):
        extra = dict(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
        return extra if family == "qwen3" else {**extra, "sliding_window": preset.max_position_embeddings}
    if family == "mistral":  # the real presets' window is above max_position_embeddings: it never bites
        return dict(
            sliding_window=preset.sliding_window if preset.tiny else 2 * preset.max_position_embeddings
        )
    if family in GEMMA:
        return _gemma_config(family, preset)
    if family == "mixtral":
        return dict(
            num_local_experts=preset.num_experts,
            num_experts_per_tok=preset.num_experts_per_tok,
            intermediate_size=preset.moe_intermediate_size,
            sliding_window=None,
            router_jitter_noise=0.0,
            output_router_logits=False,
        )
    # qwen3_moe: the tiny preset keeps one dense layer and unnormalised top-k weights: both paths are tested.
    return dict(
        num_experts=preset.num_experts,
        num_experts_per_tok=preset.num_experts_per_tok,
        moe_intermediate_size=preset.moe_intermediate_size,
        norm_topk_prob=not preset.tiny,
        decoder_sparse_step=1,
        mlp_only_layers=[layers - 1] if preset.tiny else [],
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=layers,
        output_router_logits=False,
    )


def _gemma_config(family: str, preset: Preset) -> dict:
    config = dict(
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=24 if preset.tiny else preset.head_dim,
        sliding_window=preset.sliding_window,
        attention_bias=False,
    )
    if family == "gemma2":  # Gemma 2's caps are 50 and 30; the tiny model's scores are too small for those
        return dict(
            config,
            attn_logit_softcapping=5.0 if preset.tiny else 50.0,
            final_logit_softcapping=20.0 if preset.tiny else 30.0,
        )
    config.update(
        rope_local_base_freq=10000.0,
        sliding_window_pattern=6,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
    )
    if preset.tiny:  # two layers: one local, one global; the global one's rope scaled, as in Gemma 3 4B+
        config.update(
            layer_types=["sliding_attention", "full_attention"],
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        )
    return config


def generation_config(config: dict, family: str) -> dict:
    """Generation stops at the end of text or the end of a chat turn, as the family's hub checkpoints say."""
    from pdserve.tools.make_tokenizer import family_token_ids

    ids = family_token_ids(family)
    return {
        "bos_token_id": config["bos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "eos_token_id": sorted({ids["eos"], ids["end_of_turn"]}),
        "do_sample": False,
    }


def weight_specs(config: dict) -> list:
    """Every tensor in HF's names and shapes, in the order a loader reads them."""
    from pdserve.tools.safetensors_writer import TensorSpec

    h, d = config["hidden_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    model_type = config["model_type"]
    specs = [TensorSpec("model.embed_tokens.weight", (config["vocab_size"], h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,)),
            TensorSpec(p + "self_attn.q_proj.weight", (q, h)),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, h)),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, h)),
        ]
        if config["model_type"] == "qwen2" or config.get("attention_bias"):
            specs += [
                TensorSpec(p + "self_attn.q_proj.bias", (q,)),
                TensorSpec(p + "self_attn.k_proj.bias", (kv,)),
                TensorSpec(p + "self_attn.v_proj.bias", (kv,)),
            ]
        specs.append(TensorSpec(p + "self_attn.o_proj.weight", (h, q)))
        if config.get("attention_bias"):
            specs.append(TensorSpec(p + "self_attn.o_proj.bias", (h,)))
        if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
            specs += [
                TensorSpec(p + "self_attn.q_norm.weight", (d,)),
                TensorSpec(p + "self_attn.k_norm.weight", (d,)),
            ]
        specs.append(TensorSpec(p + "post_attention_layernorm.weight", (h,)))
        if model_type in ("gemma2", "gemma3_text"):
            specs += [
                TensorSpec(p + "pre_feedforward_layernorm.weight", (h,)),
                TensorSpec(p + "post_feedforward_layernorm.weight", (h,)),
            ]
        specs += _mlp_specs(config, i, p)
    specs.append(TensorSpec("model.norm.weight", (h,)))
    if not config["tie_word_embeddings"]:
        specs.append(TensorSpec("lm_head.weight", (config["vocab_size"], h)))
    return specs


def _mlp_specs(config: dict, layer: int, p: str) -> list:
    """Layer `layer`'s MLP or experts, in the family's checkpoint names."""
    from pdserve.tools.safetensors_writer import TensorSpec

    h, model_type = config["hidden_size"], config["model_type"]
    dense = [("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", config["intermediate_size"])]
    if model_type == "mixtral":
        experts, inter = config["num_local_experts"], config["intermediate_size"]
        block, names = "block_sparse_moe", ("w1", "w3", "w2")
    elif model_type == "qwen3_moe" and layer not in (config.get("mlp_only_layers") or []):
        experts, inter = config["num_experts"], config["moe_intermediate_size"]
        block, names = "mlp", ("gate_proj", "up_proj", "down_proj")
    else:
        gate, up, down, inter = dense[0]
        return [
            TensorSpec(p + gate + ".weight", (inter, h)),
            TensorSpec(p + up + ".weight", (inter, h)),
            TensorSpec(p + down + ".weight", (h, inter)),
        ]
    specs = [TensorSpec(f"{p}{block}.gate.weight", (experts, h))]
    for e in range(experts):
        gate, up, down = (f"{p}{block}.experts.{e}.{n}.weight" for n in names)
        specs += [TensorSpec(gate, (inter, h)), TensorSpec(up, (inter, h)), TensorSpec(down, (h, inter))]
    return specs


def _tensor_seed(seed: int, family: str, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{family}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_tensor(spec, seed: int, config: dict, dtype):
    """Random values for one tensor, by the rules in the module docstring."""
    import torch

    gen = torch.Generator().manual_seed(_tensor_seed(seed, config["model_type"], spec.name))
    values = torch.randn(spec.shape, generator=gen, dtype=torch.float32)
    head_std = LM_HEAD_GAIN / config["hidden_size"] ** 0.5
    gemma = config["model_type"] in ("gemma2", "gemma3_text")
    # Gemma scales embeddings by sqrt(hidden) and norms every branch's output to unit rms: embeddings of std
    # 1/sqrt(hidden) enter the residual at unit rms, as trained Gemma's do, not drowned by the branches.
    embed_std = config["hidden_size"] ** -0.5 if gemma else EMBED_STD
    if spec.name.endswith("norm.weight"):
        values = values.mul_(NORM_WEIGHT_STD).add_(1.0)
        if spec.name == "model.norm.weight" and config["tie_word_embeddings"]:
            values = values.mul_(head_std / embed_std)  # the head is the (small) embedding: scale logits here
        if gemma:
            values = values.sub_(1.0)  # Gemma's norms scale by (1 + w): store w
    elif spec.name.endswith(".bias"):
        values = values.mul_(BIAS_STD)
    elif spec.name == "model.embed_tokens.weight":
        values = values.mul_(embed_std)
    elif spec.name == "lm_head.weight":
        values = values.mul_(head_std)
    else:
        values = values.mul_(spec.shape[1] ** -0.5)
    return values.to(dtype)


def make_model(
    path: str,
    family: str = "llama",
    preset: str = "tiny",
    seed: int = 0,
    dtype: str | None = None,
    config_overrides: dict | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
    weights: bool = True,
) -> str:
    """Write the checkpoint folder at `path` (created if needed); returns `path`.

    config_overrides: keys merged into config.json after the preset (e.g. a `rope_scaling` for tests).
    weights=False writes everything but the safetensors, for `--load-format dummy` (a 30B shape is 61 GB).
    """
    import torch
    from tqdm import tqdm

    from pdserve.tools.make_tokenizer import write_tokenizer_files
    from pdserve.tools.safetensors_writer import write_checkpoint

    # 1. Check the request.
    if family not in FAMILIES:
        raise ConfigError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if preset not in PRESETS:
        raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    shape = PRESETS[preset]
    dtype = dtype or shape.dtype
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ConfigError(f"--dtype must be float32, float16 or bfloat16, got {dtype!r}")
    os.makedirs(path, exist_ok=True)
    _remove_old_weights(path)
    # 2. config.json and generation_config.json.
    config = build_config(family, replace(shape, dtype=dtype), dtype)
    config.update(config_overrides or {})
    _write_json(os.path.join(path, "config.json"), config)
    _write_json(os.path.join(path, "generation_config.json"), generation_config(config, family))
    # 3. The tokenizer, sized to the vocabulary.
    write_tokenizer_files(
        path, config["vocab_size"], family, model_max_length=config["max_position_embeddings"]
    )
    if not weights:
        return path
    # 4. Weights, one tensor at a time.
    specs = weight_specs(config)
    total = sum(s.numel for s in specs) * torch.empty((), dtype=torch_dtype).element_size()
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"writing {os.path.basename(path) or path}",
        disable=not progress,
    ) as bar:
        write_checkpoint(
            path,
            specs,
            torch_dtype,
            lambda spec: make_tensor(spec, seed, config, torch_dtype),
            max_shard_bytes,
            on_bytes=bar.update,
            workers=min(4, os.cpu_count() or 1),
        )
    return path


def _remove_old_weights(path: str) -> None:
    """A folder written before (another preset, sharded or not) must not leave weights the loader would pick
    up."""
    for name in os.listdir(path):
        if name == "model.safetensors.index.json" or (
            name.startswith("model") and name.endswith((".safetensors", ".safetensors.partial"))
        ):
            os.remove(os.path.join(path, name))


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-model", help="write a random-weight HF checkpoint with a real tokenizer"
    )
    parser.add_argument("dir", help="output folder (created if needed)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="weights' dtype (default: float32 for tiny, bfloat16 otherwise)",
    )
    parser.add_argument(
        "--no-weights",
        action="store_true",
        help="config, generation config and tokenizer only: serve it with --load-format dummy",
    )
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    path = make_model(
        args.dir,
        family=args.family,
        preset=args.preset,
        seed=args.seed,
        dtype=args.dtype,
        weights=not args.no_weights,
    )
    what = "config and tokenizer (no weights: --load-format dummy)" if args.no_weights else "checkpoint"
    print(f"wrote {args.family} ({args.preset}) {what} to {path}")
    return 0
