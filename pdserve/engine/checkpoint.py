"""Read a Hugging Face checkpoint folder: config.json into a frozen `ArchConfig`, and its safetensors tensors.

Every problem a user can cause (a wrong path, a half-copied folder, a truncated download, a model we do not
implement) is a `CheckpointError` whose message is one line naming the file and the fix. torch and safetensors
are imported only when tensors are read, so `load_arch_config` stays cheap for callers that need only shapes.

Sliding windows (Mistral v0.1, Gemma's local layers, Qwen with use_sliding_window): `layer_windows` gives each
layer's window (0: full attention) and the attention kernels mask by it, so contexts may grow past the window.
What each family adds to the Llama decoder is read by engine/model_features.py.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator

from pdserve.engine.model_features import (
    ACTIVATIONS,
    TIED_BY_DEFAULT,
    MoEConfig,
    activation,
    family_fields,
    global_rope_params,
)
from pdserve.wire.errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # linear | llama3
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ArchConfig:
    architecture: str  # e.g. LlamaForCausalLM
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int  # the longest context we serve
    config_max_position_embeddings: int
    # config.json's window, None: full attention (which layers use it: layer_windows)
    sliding_window: int | None
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always, Llama when attention_bias
    o_bias: bool  # Llama when attention_bias
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: frozenset  # config.json's and generation_config.json's eos_token_id, merged
    torch_dtype: str | None  # the dtype the weights were saved in, as config.json says
    # What the family adds (engine/model_features.py); the defaults are Llama's.
    layer_windows: tuple[int, ...] = ()  # per layer: 0 full attention, else its sliding window in tokens
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh (GeGLU)
    qk_norm: bool = False  # RMSNorm over each head's q and k before rotary (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # norms scale by (norm_offset + w): 1.0 for Gemma
    sandwich_norms: bool = False  # norms after attention and after the MLP as well (Gemma)
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden_size))
    attn_scale: float = 0.0  # softmax scale (head_dim ** -0.5 unless the family says otherwise)
    attn_softcap: float = 0.0  # 0: off; else scores become cap * tanh(scores / cap)
    final_softcap: float = 0.0  # the same on the final logits
    local_rope_theta: float | None = None  # sliding layers' rope base (Gemma 3); None: rope_theta
    moe: MoEConfig | None = None  # experts in place of the MLP (Mixtral, Qwen3-MoE)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return value


def read_config(model_dir: str) -> dict:
    """config.json as a dict, after checking the folder exists and holds one."""
    if not os.path.exists(model_dir):
        raise CheckpointError(f"model folder {model_dir!r} does not exist")
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir!r} is not a folder (give the checkpoint's folder)")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir}: no config.json (is this a Hugging Face checkpoint folder?)")
    return _read_json(path, "config.json")


def _rope(config: dict, path: str) -> tuple[float, RopeScaling | None]:
    """Accepts the hub's `rope_theta` + `rope_scaling` and transformers 5's `rope_parameters`."""
    params = dict(config.get("rope_scaling") or {})
    params.update(global_rope_params(config))
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(
            f"{path}: rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    keys = (
        ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if rope_type == "llama3"
        else ()
    )
    try:
        extra = {k: params[k] for k in keys}
        return theta, RopeScaling(rope_type=rope_type, factor=float(params["factor"]), **extra)
    except KeyError as exc:
        raise CheckpointError(f"{path}: rope scaling {rope_type!r} lacks {exc.args[0]!r}") from None


def _generation_eos(model_dir: str) -> set[int]:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    value = _read_json(path, "generation_config.json").get("eos_token_id")
    return _ids(value)


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def load_arch_config(model_dir: str) -> ArchConfig:
    """Read and check config.json; unsupported architectures and activations are refused here."""
    from pdserve.engine.models.registry import SUPPORTED_ARCHITECTURES

    config = read_config(model_dir)
    path = os.path.join(model_dir, "config.json")
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise CheckpointError(
            f"{path}: architecture {', '.join(archs) or '(none given)'} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    act = activation(config)
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
        )
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        theta, scaling = _rope(config, path)
        max_pos = int(config.get("max_position_embeddings", 2048))
        attention_bias = bool(config.get("attention_bias", False))
        layers = int(config["num_hidden_layers"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        features = family_fields(config, layers, head_dim)
        windows = [w for w in features["layer_windows"] if w]
        arch_config = ArchConfig(
            architecture=arch,
            model_type=str(config.get("model_type", "")),
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            config_max_position_embeddings=max_pos,
            sliding_window=max(windows) if windows else None,
            tie_word_embeddings=bool(
                config.get("tie_word_embeddings", config.get("model_type") in TIED_BY_DEFAULT)
            ),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=frozenset(_ids(config.get("eos_token_id")) | _generation_eos(model_dir)),
            torch_dtype=config.get("torch_dtype", config.get("dtype")),
            **features,
        )
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing required field {exc.args[0]!r}") from None
    except TypeError as exc:
        raise CheckpointError(f"{path}: a field has the wrong type ({exc})") from None
    except ValueError as exc:  # a bad value (int("x") says so too), named by the check that refused it
        raise CheckpointError(f"{path}: {exc}") from None
    if arch_config.num_attention_heads % arch_config.num_key_value_heads:
        raise CheckpointError(f"{path}: num_attention_heads must be a multiple of num_key_value_heads")
    return arch_config


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files to read, from the index when the checkpoint is sharded."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = _read_json(index, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(model_dir, name)):
                raise CheckpointError(f"{model_dir}: shard {name} named in {INDEX_FILE} is missing")
        return [os.path.join(model_dir, name) for name in files]
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, f) for f in found]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(model_dir)):
        raise CheckpointError(f"{model_dir}: only .safetensors weights are supported (found PyTorch pickles)")
    raise CheckpointError(f"{model_dir}: no weights (expected {SINGLE_FILE} or {INDEX_FILE})")


def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
        raise CheckpointError(
            f"{path}: not a readable safetensors file, corrupt or truncated ({exc})"
        ) from None


def iter_tensors(model_dir: str, dtype=None, progress: bool = True) -> Iterator[tuple[str, "object"]]:
    """Yield (name, CPU tensor) for every tensor in the checkpoint, cast to `dtype` when given."""
    from tqdm import tqdm

    files = weight_files(model_dir)
    handles = [(path, _open(path)) for path in files]
    total = sum(len(handle.keys()) for _, handle in handles)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress) as bar:
        for path, handle in handles:
            for name in handle.keys():
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(
                        f"{path}: tensor {name} cannot be read, file corrupt ({exc})"
                    ) from None
                yield name, (tensor.to(dtype) if dtype is not None else tensor)
                bar.update(1)
